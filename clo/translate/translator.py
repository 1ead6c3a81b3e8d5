"""English sentences -> target-language sentences: an M2M100 / NLLB-200 folder, its tokenizer and decoding settings.

The checkpoint's generation_config.json gives the decoding defaults (clo/translate/search.py);
`beams` and `max_length` override them. Sentences come in already segmented
(clo/translate/segment.py); translate.py drives batching, resume and output.
"""

import torch

from clo.languages import Language, get_language
from clo.translate.m2m100 import M2M100Config, load_m2m100
from clo.translate.search import GenerationSettings, generate
from clo.translate.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Translator:
    """English sentences -> target-language sentences with an M2M100 (or NLLB-200) checkpoint."""

    def __init__(self, model_dir: str, language: Language, device: str, dtype: str,
                 beams: int | None, max_length: int | None, compile: bool = False):
        self.device = torch.device(device)
        self.compile = compile  # beam search through the compiled static-shape step (clo/translate/static_decode.py)
        M2M100Config.from_folder(model_dir)  # is it an M2M100 at all? (cheap, before the tokenizer)
        self.tokenizer = load_tokenizer(model_dir)
        self.src_lang = self.tokenizer.code_of(get_language("en"))
        self.tgt_id = self.tokenizer.lang_id(self.tokenizer.code_of(language))
        self.tokenizer.lang_id(self.src_lang)
        defaults = GenerationSettings.from_folder(model_dir)  # checked before the weights are read
        self.model = load_m2m100(model_dir, self.device, DTYPES[dtype])
        self.settings = GenerationSettings(
            max_length=max_length or defaults.max_length,
            num_beams=beams or defaults.num_beams,
            length_penalty=defaults.length_penalty,
            early_stopping=defaults.early_stopping,
        )

    def encode(self, sentence: str) -> list[int]:
        return self.tokenizer.encode(sentence, self.src_lang)

    def translate_batch(self, batch: list[list[int]]) -> list[str]:
        """Encoded sentences (as from `encode`) -> their translations, in order."""
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_id
        src = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=self.device)
        outputs = generate(self.model, src, mask, self.tgt_id, self.settings, self.compile)
        return [self.tokenizer.decode(ids) for ids in outputs]
