"""Step 1 of the pipeline: English SFT data -> cross-lingual pairs (translate.py drives it).

M2M100 and its tokenizer, decoding, sentence segmentation, the SFT sources it reads, and pairs built
from human translations. Imports only the floor; never model, train or eval.
"""
