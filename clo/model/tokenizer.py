"""One small tokenizer interface over the two formats the paper's models ship.

- `tokenizer.json` (Llama-3, Qwen-2.5, SmolLM2: byte-level BPE), through the `tokenizers` library,
  which runs the exact pipeline the file describes.
- `tokenizer.model` (Llama-2, Mistral: sentencepiece), through `sentencepiece`.

`encode` never adds BOS or EOS: callers (clo/model/chat.py) add them once, on purpose, so a prompt never
starts with two BOS. Special tokens written in the text (`<|im_start|>`) become their ids.
"""

import re
from pathlib import Path

from clo.errors import CloError
from clo.jsonfile import read_json


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids, with the checkpoint's special tokens.

    Attributes: bos_id, eos_id, pad_id (ints or None); stop_ids (ids that end generation);
    adds_bos (whether this model's own tokenizer puts BOS before a plain prompt);
    chat_template (the checkpoint's Jinja template string, or None);
    chat_format (the format train.py trained this checkpoint with, recorded in tokenizer_config.json
    as "clo_chat_format", or None).
    """

    def __init__(self, folder: Path):
        self.folder = folder
        config = read_json(folder / "tokenizer_config.json", missing_ok=True)
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # some checkpoints ship several named templates
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.chat_format = config.get("clo_chat_format")
        self._special: dict[str, int] = {}
        if (folder / "tokenizer.json").is_file():
            self._init_json(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            self._init_sentencepiece(folder / "tokenizer.model", config)
        else:
            raise CloError(f"{folder}: no tokenizer.json or tokenizer.model (no tokenizer)")

        def special_id(field):
            token = _token_str(config.get(field))
            return None if token is None else self.token_id(token)

        model_config = read_json(folder / "config.json", missing_ok=True)
        self.bos_id = special_id("bos_token")
        if self.bos_id is None:
            self.bos_id = model_config.get("bos_token_id")
        self.eos_id = special_id("eos_token")
        if self.eos_id is None:
            self.eos_id = model_config.get("eos_token_id")
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        self.pad_id = special_id("pad_token")
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        if "add_bos_token" in config:
            self.adds_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        else:
            self.adds_bos = self._default_adds_bos()

        gen_eos = read_json(folder / "generation_config.json", missing_ok=True).get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.stop_ids = {i for i in [self.eos_id, *gen_eos] if i is not None}

    # --- tokenizer.json -------------------------------------------------------------------------

    def _init_json(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions with long messages
            raise CloError(f"{path}: cannot read tokenizer: {str(e).splitlines()[0]}") from None
        self._sp = None
        self.vocab_size = self._hf.get_vocab_size()

    def _default_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        if self._sp is not None:
            return True  # sentencepiece Llama/Mistral tokenizers add BOS unless told otherwise
        with_special = self._hf.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_id

    # --- sentencepiece --------------------------------------------------------------------------

    def _init_sentencepiece(self, path: Path, config: dict):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise CloError(f"{path}: cannot read sentencepiece model: {e}") from None
        self._hf = None
        self.vocab_size = self._sp.get_piece_size()
        for i in range(self.vocab_size):  # <s>, </s>, <unk> and user-defined control pieces
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                self._special[self._sp.id_to_piece(i)] = i
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            if entry.get("special", False):
                self._special[entry["content"]] = int(key)
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True))) + ")")

    # --- the interface --------------------------------------------------------------------------

    def token_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        if token in self._special:
            return self._special[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no BOS/EOS added; special-token strings in the text map to their ids."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        ids = []
        for part in self._special_re.split(text) if self._special else [text]:
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if i not in self._special.values()]
        return self._sp.decode(ids)


def load_tokenizer(folder: Path | str) -> Tokenizer:
    return Tokenizer(Path(folder))
