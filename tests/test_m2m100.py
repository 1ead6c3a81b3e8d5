"""clo.translate.m2m100 and clo.translate.tokenizer against transformers' M2M100 (the oracle), on tiny random
checkpoints written in HF format by the tests."""

import json
from pathlib import Path

import pytest
import sentencepiece
import torch

from clo.errors import CloError
from clo.translate.m2m100 import load_m2m100
from clo.translate.search import GenerationSettings, beam_search, generate
from clo.translate.static_decode import SOURCE_BUCKET, decode_step
from clo.translate.tokenizer import LANGUAGE_CODES, M2M100Tokenizer, NllbTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

FLORES = {"en": "eng_Latn", "sw": "swh_Latn", "yo": "yor_Latn", "id": "ind_Latn",
          "ko": "kor_Hang", "zh": "zho_Hans", "de": "deu_Latn"}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_tiny_m2m100(folder: Path, vocab_size: int, seed: int = 0, eos_bias: float = 3.0,
                      generation: dict | None = None) -> "transformers.M2M100ForConditionalGeneration":
    """A random 2+2-layer M2M100 saved with save_pretrained. Weights are drawn wider than the default
    init and the decoder is nudged towards </s>, so that outputs depend on the source and end at
    varied lengths (with the default init every sentence decodes the same way, to max_length)."""
    torch.manual_seed(seed)
    config = transformers.M2M100Config(
        vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        dropout=0.0, attention_dropout=0.0, init_std=0.3,
    )
    model = transformers.M2M100ForConditionalGeneration(config).eval()
    with torch.no_grad():
        eos = model.model.shared.weight[config.eos_token_id]
        model.model.decoder.layer_norm.bias.add_(eos_bias * eos / eos.norm())
    model.save_pretrained(folder)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return model


def write_tiny_tokenizer(folder: Path, lines: list[str], vocab_size: int = 400, drop: int = 10) -> int:
    """sentencepiece.bpe.model trained on `lines` and a fairseq-style vocab.json (<s> <pad> </s> <unk>
    first, then the pieces, `drop` of them left out so that some pieces map to <unk>).
    Returns the model vocabulary size: dictionary + 100 language tokens + 8 "madeup" words."""
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "sp"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=0.98, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False, minloglevel=2,
    )
    (folder / "sp.model").rename(folder / "sentencepiece.bpe.model")
    (folder / "sp.vocab").unlink()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "sentencepiece.bpe.model"))
    pieces = [sp.id_to_piece(i) for i in range(4, sp.get_piece_size())]
    del pieces[len(pieces) // 2: len(pieces) // 2 + drop]
    vocab = {p: i for i, p in enumerate(["<s>", "<pad>", "</s>", "<unk>", *pieces])}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return len(vocab) + len(LANGUAGE_CODES["m2m100"]) + 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m2m100_tiny")
    return folder, write_tiny_m2m100(folder, vocab_size=64)


def random_batch(vocab_size: int, seed: int = 1):
    """A right-padded batch of 6 sources `[tokens] </s>` with lengths 3..12 (pad 1, eos 2)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [12, 3, 9, 7, 12, 5]
    src = torch.full((len(lengths), max(lengths)), 1)
    for row, n in enumerate(lengths):
        src[row, :n - 1] = torch.randint(4, vocab_size, (n - 1,), generator=gen)
        src[row, n - 1] = 2
    return src, src.ne(1).long()


def test_logits_match_transformers(tiny):
    folder, hf = tiny
    ours = load_m2m100(folder)
    src, mask = random_batch(64)
    tgt = torch.randint(4, 64, (src.size(0), 7))
    tgt[:, 0] = 2
    tgt[2, 4] = 1  # a pad inside the decoder input: fairseq positions skip it
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, mask, tgt)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


SETTINGS = [
    dict(num_beams=1, max_length=20),
    dict(num_beams=4, max_length=20, early_stopping=True),
    dict(num_beams=3, max_length=20, early_stopping=False),
    dict(num_beams=2, max_length=20, early_stopping="never", length_penalty=0.7),
    dict(num_beams=5, max_length=20, early_stopping=True, length_penalty=2.0),
    dict(num_beams=4, max_length=9, early_stopping=False, length_penalty=-0.5),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"beams{s['num_beams']}-{s.get('early_stopping')}")
def test_generation_matches_transformers(tiny, settings):
    folder, hf = tiny
    ours = load_m2m100(folder)
    lengths = []
    for seed in (1, 2):
        src, mask = random_batch(64, seed)
        expected = hf.generate(input_ids=src, attention_mask=mask, forced_bos_token_id=10, do_sample=False, **settings)
        got = generate(ours, src, mask, 10, GenerationSettings(**settings))
        for row, ids in zip(expected.tolist(), got):
            # transformers: [start, generated..., pad...]; ours: the generated ids only
            assert ids[0] == 10
            assert row[1:1 + len(ids)] == ids
            assert all(t == 1 for t in row[1 + len(ids):])
            lengths.append(len(ids))
    # The oracle comparison means something only if sentences end at different lengths.
    assert len(set(lengths)) > 1, lengths


@pytest.mark.parametrize("settings", [s for s in SETTINGS if s["num_beams"] > 1], ids=lambda s: f"beams{s['num_beams']}-{s.get('early_stopping')}")
def test_beam_search_in_static_shapes_matches_transformers(tiny, settings):
    """The step that compiles (clo/translate/static_decode.py), run eagerly: a full-length cache written in
    place, reordering inside the step, padded cross-attention, done sentences kept in the batch; the
    same outputs as transformers' generate, also on a second batch that reuses the first one's buffers."""
    folder, hf = tiny
    ours = load_m2m100(folder)
    calls = []

    def step(*args):
        calls.append(args[3].item())  # the slot
        return decode_step(*args)

    for seed in (1, 2):
        src, mask = random_batch(64, seed)
        assert src.size(1) % SOURCE_BUCKET  # the cross-attention buffers are padded
        expected = hf.generate(input_ids=src, attention_mask=mask, forced_bos_token_id=10, do_sample=False, **settings)
        got = beam_search(ours, src, mask, 10, GenerationSettings(**settings), step=step)
        for row, ids in zip(expected.tolist(), got):
            assert row[1:1 + len(ids)] == ids and all(t == 1 for t in row[1 + len(ids):])
    assert calls and calls[0] == 0 and max(calls) >= 2  # every step went through decode_step
    assert len(ours._static_decode_buffers) == 2  # one self-attention and one cross-attention set, both batches


def test_load_pytorch_bin_with_legacy_keys(tiny, tmp_path):
    """Old checkpoints: pytorch_model.bin with stored position tables, per-side embeddings, lm_head."""
    folder, hf = tiny
    state = hf.state_dict()
    state["model.encoder.embed_positions.weights"] = torch.zeros(130, 32)
    state["model.encoder.embed_tokens.weight"] = state["model.shared.weight"]
    state["lm_head.weight"] = state["model.shared.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    src, mask = random_batch(64)
    tgt = torch.full((src.size(0), 1), 2)
    with torch.no_grad():
        assert torch.equal(load_m2m100(tmp_path)(src, mask, tgt), load_m2m100(folder)(src, mask, tgt))


def test_bad_model_folders(tiny, tmp_path):
    folder, _ = tiny
    with pytest.raises(CloError, match="no config.json"):
        load_m2m100(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(CloError, match="'model_type' is 'llama'"):
        load_m2m100(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CloError, match="no model.safetensors or pytorch_model.bin"):
        load_m2m100(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["d_model"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CloError, match="shape"):
        load_m2m100(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CloError, match="cannot read weights"):
        load_m2m100(tmp_path)
    # a config of far more layers than the weights hold is refused before the model is built (even on meta)
    config = {**json.loads((folder / "config.json").read_text()), "encoder_layers": 10**6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CloError, match="encoder_layers is 1000000, the weights hold 2"):
        load_m2m100(tmp_path)
    # a shard index may name only files of the folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "inner" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(CloError, match="field 'weight_map' is not a map of tensor names to file names in this folder"):
        load_m2m100(tmp_path / "inner")


def test_generation_settings_follow_the_checkpoint(tmp_path):
    assert GenerationSettings.from_folder(tmp_path) == GenerationSettings()  # transformers' defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"num_beams": 5, "max_length": 200, "early_stopping": True, "decoder_start_token_id": 2}))
    assert GenerationSettings.from_folder(tmp_path) == GenerationSettings(200, 5, 1.0, True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"no_repeat_ngram_size": 3}))
    with pytest.raises(CloError, match="no_repeat_ngram_size"):
        GenerationSettings.from_folder(tmp_path)
    # beam search allocates [sentences, beams, max_length] up front: absurd values are refused, never allocated
    for bad, field in (({"max_length": 10**9}, "max_length"), ({"num_beams": 0.5}, "num_beams"),
                       ({"length_penalty": float("nan")}, "length_penalty"), ({"max_length": "long"}, "max_length")):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(CloError, match=f"field '{field}' is"):
            GenerationSettings.from_folder(tmp_path)


def flores_lines(shared_data: Path, per_language: int | None = None) -> dict[str, list[str]]:
    return {code: (shared_data / "flores200_devtest" / f"{name}.devtest").read_text(encoding="utf-8")
            .splitlines()[:per_language] for code, name in FLORES.items()}


def test_tokenizer_matches_transformers_on_flores(shared_data, tmp_path):
    lines = flores_lines(shared_data)
    train = [line for code in lines for line in lines[code][:300]]
    write_tiny_tokenizer(tmp_path, train, vocab_size=1500, drop=10)
    ours = M2M100Tokenizer(tmp_path)
    oracle = transformers.M2M100Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "sentencepiece.bpe.model"))
    assert ours.lang_id("en") == oracle.get_lang_id("en") and ours.lang_id("zu") == oracle.get_lang_id("zu")
    unknown = 0
    for code, texts in lines.items():
        oracle.src_lang = code
        expected = oracle(texts)["input_ids"]
        for text, ids in zip(texts, expected):
            assert ours.encode(text, code) == ids, text
            unknown += ids.count(ours.unk_id)
            # transformers 5 no longer counts language tokens as special when decoding: drop them first
            without_lang = [i for i in ids if i not in ours.lang_ids.values()]
            assert ours.decode(ids) == oracle.decode(without_lang, skip_special_tokens=True)
    assert unknown > 0  # the pieces left out of vocab.json were exercised


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CloError, match="no sentencepiece.bpe.model"):
        M2M100Tokenizer(tmp_path)
    write_tiny_tokenizer(tmp_path, ["a small corpus of words", "more words here"] * 20, vocab_size=60)
    with pytest.raises(CloError, match="language 'xx'.*sw"):
        M2M100Tokenizer(tmp_path).lang_id("xx")


def write_tiny_nllb_tokenizer(folder: Path, lines: list[str], codes: list[str], vocab_size: int = 1200):
    """An NLLB-style tokenizer folder: a sentencepiece model with sentencepiece's own special ids
    (<unk> 0, <s> 1, </s> 2, as NLLB's is), and tokenizer.json written by transformers'
    NllbTokenizer with `codes` as its language tokens. Returns that transformers tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "sentencepiece.bpe"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=0.98, hard_vocab_limit=False, minloglevel=2)
    (folder / "sentencepiece.bpe.vocab").unlink()
    oracle = transformers.NllbTokenizer.from_pretrained(str(folder), additional_special_tokens=codes)
    oracle.save_pretrained(str(folder))
    return oracle


def test_nllb_tokenizer_matches_transformers_on_flores(shared_data, tmp_path):
    lines = {code: [line.strip() for line in texts] for code, texts in flores_lines(shared_data).items()}
    codes = [FLORES[code] for code in lines]
    oracle = write_tiny_nllb_tokenizer(tmp_path, [line for c in ("en", "sw", "zh", "de") for line in lines[c][:300]], codes)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, NllbTokenizer) and set(ours.lang_ids) == set(codes)
    unknown = 0
    for code, texts in lines.items():
        oracle.src_lang = FLORES[code]
        for text, ids in zip(texts, oracle(texts)["input_ids"]):
            # NLLB ids are sentencepiece ids + 1; text without surrounding spaces, as translate.py
            # feeds it (on a trailing space transformers' fast tokenizer adds a "▁" that
            # sentencepiece, which NLLB was trained with, does not)
            assert ours.encode(text, FLORES[code]) == ids, text
            unknown += ids.count(ours.unk_id)
            assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=True).strip()
    assert unknown > 0  # Korean and Yoruba characters the small model never saw
