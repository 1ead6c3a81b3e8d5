"""The M2M100 tokenizer: a sentencepiece model, fairseq's vocab.json, and `__xx__` language tokens.

An M2M100 checkpoint folder (facebook/m2m100_418M, facebook/m2m100_1.2B) holds:
  - sentencepiece.bpe.model: splits text into pieces ("▁Hello", "▁world", ".");
  - vocab.json: fairseq's dictionary, piece -> id ("<s>" 0, "<pad>" 1, "</s>" 2, "<unk>" 3, ...);
    a piece missing from it becomes <unk>;
  - the language tokens `__af__` ... `__zu__`, which are not in vocab.json: they take the ids right
    after it, in fairseq's fixed order (LANGUAGE_CODES below), so `__en__` is len(vocab) + 18.

A source sentence is encoded as `[__src__] pieces [</s>]`; the decoder starts from `</s>` and is then
forced to emit `[__tgt__]`, so the model knows which language to write (see clo/translate/m2m100.py).

This reproduces `transformers.M2M100Tokenizer` id for id on ordinary text (tests/test_m2m100.py).
One deliberate difference: the strings "<s>", "</s>", "<pad>", "<unk>" inside the text are encoded
as text, whereas transformers turns them into the special ids; here the text is data, and a literal
"</s>" in an answer must not end the sentence.

NLLB-200 checkpoints share the model and the input layout; `NllbTokenizer` below covers their
tokenizer, and `load_tokenizer` picks the right one for a folder.
"""

import json
from pathlib import Path

import sentencepiece

from clo.errors import CloError
from clo.jsonfile import read_json
from clo.languages import Language

# fmt: off
LANGUAGE_CODES = {
    "m2m100": [
        "af", "am", "ar", "ast", "az", "ba", "be", "bg", "bn", "br", "bs", "ca", "ceb", "cs", "cy", "da",
        "de", "el", "en", "es", "et", "fa", "ff", "fi", "fr", "fy", "ga", "gd", "gl", "gu", "ha", "he",
        "hi", "hr", "ht", "hu", "hy", "id", "ig", "ilo", "is", "it", "ja", "jv", "ka", "kk", "km", "kn",
        "ko", "lb", "lg", "ln", "lo", "lt", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "my", "ne", "nl",
        "no", "ns", "oc", "or", "pa", "pl", "ps", "pt", "ro", "ru", "sd", "si", "sk", "sl", "so", "sq",
        "sr", "ss", "su", "sv", "sw", "ta", "th", "tl", "tn", "tr", "uk", "ur", "uz", "vi", "wo", "xh",
        "yi", "yo", "zh", "zu",
    ],
    "wmt21": ["en", "ha", "is", "ja", "cs", "ru", "zh", "de"],
}
# fmt: on

SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>")


class M2M100Tokenizer:
    """Text <-> ids for an M2M100 checkpoint folder.

    >>> tok = M2M100Tokenizer("m2m100_418M")
    >>> tok.encode("Hello world.", "en")      # [__en__, ▁Hello, ▁world, ., </s>]
    >>> tok.decode(ids)                       # drops special and language tokens
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        spm_path, vocab_path = folder / "sentencepiece.bpe.model", folder / "vocab.json"
        for path in (spm_path, vocab_path):
            if not path.is_file():
                raise CloError(f"{folder}: no {path.name}; not an M2M100 tokenizer folder")
        self.vocab: dict[str, int] = read_json(vocab_path)
        missing = [p for p in SPECIAL_PIECES if p not in self.vocab]
        if missing:
            raise CloError(f"{vocab_path}: special pieces {missing} are missing")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(spm_path))
        except (OSError, RuntimeError) as e:
            raise CloError(f"{spm_path}: cannot load sentencepiece model ({e})") from None

        self.piece_of = {i: p for p, i in self.vocab.items()}
        self.bos_id, self.pad_id = self.vocab["<s>"], self.vocab["<pad>"]
        self.eos_id, self.unk_id = self.vocab["</s>"], self.vocab["<unk>"]

        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, missing_ok=True)
        codes_name = config.get("language_codes", "m2m100")
        if codes_name not in LANGUAGE_CODES:
            raise CloError(f"{config_path}: field 'language_codes' is {codes_name!r}; known: {list(LANGUAGE_CODES)}")
        # Language tokens follow the dictionary, in fairseq's order.
        self.lang_ids = {code: len(self.vocab) + i for i, code in enumerate(LANGUAGE_CODES[codes_name])}
        # Ids decode() drops: specials and languages (transformers' skip_special_tokens=True).
        self.special_ids = {self.bos_id, self.pad_id, self.eos_id, self.unk_id, *self.lang_ids.values()}

    @staticmethod
    def code_of(language: Language) -> str:
        """The language's code in this tokenizer: "sw" (M2M100's own codes)."""
        return language.m2m100

    def lang_id(self, code: str) -> int:
        """The id of `__code__`, e.g. lang_id("sw") for `__sw__`; a one-line error for unknown codes."""
        if code not in self.lang_ids:
            raise CloError(f"{self.folder}: language {code!r} is not in this tokenizer; it has: {', '.join(self.lang_ids)}")
        return self.lang_ids[code]

    def encode(self, text: str, lang: str) -> list[int]:
        """`[__lang__] pieces [</s>]`, the encoder input for a sentence in language `lang`."""
        pieces = self.sp.encode(text, out_type=str)
        return [self.lang_id(lang)] + [self.vocab.get(p, self.unk_id) for p in pieces] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, without special or language tokens."""
        pieces = [self.piece_of[i] for i in ids if i not in self.special_ids and i in self.piece_of]
        return self.sp.decode(pieces).strip()


class NllbTokenizer(M2M100Tokenizer):
    """The NLLB-200 tokenizer (facebook/nllb-200-*): the same model inputs as M2M100, `[lang] pieces
    [</s>]`, with three differences: no vocab.json (fairseq ids are sentencepiece ids + 1, with <s> 0,
    <pad> 1, </s> 2, <unk> 3 in front), language codes "swh_Latn" rather than "sw", and those codes'
    ids are read from the folder's tokenizer.json (its "added_tokens") rather than from a fixed list.
    A tokenizer_config.json with "legacy_behaviour": true puts the language last: `pieces </s> [lang]`.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        spm_path, tokenizer_json = folder / "sentencepiece.bpe.model", folder / "tokenizer.json"
        for path in (spm_path, tokenizer_json):
            if not path.is_file():
                raise CloError(f"{folder}: no {path.name}; not an NLLB tokenizer folder")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(spm_path))
            added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
        except (OSError, RuntimeError, json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CloError(f"{folder}: cannot read the NLLB tokenizer ({type(e).__name__}: {e})") from None
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        # Language tokens look like "swh_Latn": three letters, "_", a four-letter script.
        self.lang_ids = {t["content"]: t["id"] for t in added
                         if len(t["content"]) == 8 and t["content"][3] == "_" and t["content"][4].isupper()}
        if not self.lang_ids:
            raise CloError(f"{tokenizer_json}: no language tokens (like 'eng_Latn') in 'added_tokens'")
        self.special_ids = {self.bos_id, self.pad_id, self.eos_id, self.unk_id, *(t["id"] for t in added)}
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, missing_ok=True)
        self.legacy = bool(config.get("legacy_behaviour", False))

    @staticmethod
    def code_of(language: Language) -> str:
        """The language's code in this tokenizer: "swh_Latn" (FLORES-200 codes)."""
        return language.flores

    def piece_id(self, piece: str) -> int:
        spm_id = self.sp.piece_to_id(piece)
        return spm_id + 1 if spm_id != self.sp.unk_id() else self.unk_id

    def encode(self, text: str, lang: str) -> list[int]:
        ids = [self.piece_id(p) for p in self.sp.encode(text, out_type=str)]
        if self.legacy:
            return ids + [self.eos_id, self.lang_id(lang)]
        return [self.lang_id(lang)] + ids + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        size = self.sp.get_piece_size()
        return self.sp.decode([i - 1 for i in ids if i not in self.special_ids and 0 < i - 1 < size]).strip()


def load_tokenizer(folder: str | Path) -> M2M100Tokenizer:
    """M2M100's tokenizer if the folder has vocab.json, else NLLB-200's."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return M2M100Tokenizer(folder)
    return NllbTokenizer(folder)
