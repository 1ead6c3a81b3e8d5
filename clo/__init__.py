"""clo: a minimal PyTorch reference implementation of Cross-Lingual Optimization (arXiv 2505.14297).

The tree is the pipeline: clo/translate (English SFT data -> cross-lingual pairs), clo/train (pairs
-> model), clo/eval (model -> numbers), the last two on clo/model (the decoder, its files,
tokenizers, generation, LoRA). The modules here are the floor every stage stands on: errors,
atomic writes, JSON (Lines) files, languages, the pair format, locks and the runtime resolver.
"""
