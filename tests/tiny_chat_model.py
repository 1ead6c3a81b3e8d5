"""A tiny chat model folder for training tests: random Llama weights + a byte-level BPE trained here.

The tokenizer speaks ChatML like SmolLM2 (<|im_start|>, <|im_end|>), so it exercises the same
chat-format path as the default model, at a size that trains in seconds on a CPU.
"""

import json
from pathlib import Path

from hf_models import write_hf_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def make_tiny_chat_model(folder: Path, texts: list[str], vocab_size: int = 384, family: str = "llama", **config) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE,
        "add_bos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    write_hf_model(
        folder, family, vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, **config
    )
    return folder


def demo_texts(lang: str = "sw") -> list[str]:
    """Every prompt and response of a demo set, English and target language: text for a tiny tokenizer."""
    from clo.pairs import demo_path, load_pairs

    return [t for ex in load_pairs(demo_path(lang)).examples for t in (ex.prompt_en, ex.response_en, ex.prompt, ex.response)]


def make_tiny_training_setup(root: Path, n_examples: int = 8) -> tuple[Path, Path]:
    """(a tiny ChatML model whose tokenizer learned the Swahili demo set, a JSONL of its first n pairs)."""
    from clo.pairs import demo_path

    folder = make_tiny_chat_model(root / "tiny", demo_texts("sw"))
    data = root / f"sw{n_examples}.jsonl"
    lines = demo_path("sw").read_text(encoding="utf-8").splitlines()[:n_examples]
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder, data
