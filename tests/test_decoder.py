"""The decoder against `transformers` on the same weights, and the checkpoint loader's errors."""

import json
import os
import stat

import pytest
import torch
from hf_models import FAMILIES, write_hf_model
from safetensors.torch import load_file, save_file

from clo.errors import CloError
from clo.model.hf_folder import load_model, save_model


def tokens(batch=2, length=24, vocab=128):
    return torch.randint(3, vocab, (batch, length))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    hf = write_hf_model(tmp_path, family)
    ours = load_model(tmp_path)
    x = tokens(length=24)  # longer than mistral's window of 8, so the window is exercised
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert (got - expected).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_matters(tmp_path):
    """The llama3 scaling changes the logits at long positions, so the test above can see a mistake in it."""
    hf = write_hf_model(tmp_path, "llama3.1")
    ours = load_model(tmp_path)
    ours.cfg.rope_scaling = None
    from clo.model.decoder import rope_inv_freq

    ours.inv_freq = rope_inv_freq(ours.cfg)
    x = tokens(length=64)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() > 1e-3


def test_sliding_window_is_applied(tmp_path):
    hf = write_hf_model(tmp_path, "mistral", sliding_window=8)
    ours = load_model(tmp_path)
    x = tokens(length=32)
    with torch.no_grad():
        expected = hf(x).logits
        assert (ours(x) - expected).abs().max().item() <= 1e-4
        ours.cfg.sliding_window = None  # without the window the late positions must differ
        assert (ours(x) - expected)[:, 8:].abs().max().item() > 1e-4


@pytest.mark.parametrize("family, extra", [
    ("llama", {"sliding_window": 8}),  # transformers' Llama ignores the key: full attention
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),  # every layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),  # no layer does (2 layers)
    ("qwen2", {"use_sliding_window": False, "sliding_window": 8}),
], ids=["llama-stray-key", "qwen2-all-layers", "qwen2-no-layer", "qwen2-off"])
def test_a_window_applies_where_transformers_applies_it(tmp_path, family, extra):
    hf = write_hf_model(tmp_path, family, **extra)
    ours = load_model(tmp_path)
    x = tokens(length=32)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("extra, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rms_norm_eps": float("nan")}, "field 'rms_norm_eps' is nan; must be a positive number"),  # gave NaN weights, exit 0
    ({"rope_theta": -1.0}, "field 'rope_theta' is -1.0"),
    ({"hidden_size": "abc"}, "a field is not a number of the right kind"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_hidden_layers": 10**6}, "describes"),  # refused before a million layers are built, even on the meta device
    ({"intermediate_size": 0}, "field 'intermediate_size' is 0"),
    ({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0}}, "rope scaling 'llama3' needs a positive 'factor', got None"),
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "a sliding window on some layers only"),
])
def test_config_fields_that_change_the_math_are_refused_if_not_computed(tmp_path, extra, message):
    write_hf_model(tmp_path, "qwen2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("layer_types", None)  # transformers writes the layer kinds it derived; without them it derives them again
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **extra}))
    one_line_error(lambda: load_model(tmp_path), message)


def test_save_then_transformers_load(tmp_path):
    import transformers

    write_hf_model(tmp_path / "src", "qwen2")
    ours = load_model(tmp_path / "src")
    with torch.no_grad():
        ours.layers[0].self_attn.q_proj.weight.add_(0.5)  # a change the round trip must keep
    save_model(ours, tmp_path / "out", max_shard_bytes=20_000)  # forces several shards
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    again = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # readable as any new file is (safetensors writes 0600)


def test_bf16_load_is_close(tmp_path):
    write_hf_model(tmp_path, "llama")
    fp32 = load_model(tmp_path)
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    x = tokens()
    with torch.no_grad():
        a, b = fp32(x), bf16(x).float()
    assert (a - b).norm() / a.norm() < 2e-2


# --- bad checkpoints: one line naming the problem -------------------------------------------------


def one_line_error(fn, *match):
    with pytest.raises(CloError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg
    return msg


def test_no_config(tmp_path):
    one_line_error(lambda: load_model(tmp_path), "no config.json")


def test_no_weights(tmp_path):
    write_hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    one_line_error(lambda: load_model(tmp_path), "no model.safetensors")


def test_wrong_shape_names_the_weight(tmp_path):
    write_hf_model(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, path, metadata={"format": "pt"})
    one_line_error(lambda: load_model(tmp_path), "model.layers.1.mlp.up_proj.weight", "[3, 3]")


def test_missing_weight(tmp_path):
    write_hf_model(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["model.norm.weight"]
    save_file(state, path, metadata={"format": "pt"})
    one_line_error(lambda: load_model(tmp_path), "model.norm.weight", "missing")


@pytest.mark.parametrize("listing, message", [
    ({"metadata": {}}, "field 'weight_map'"),
    ({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}, "field 'weight_map'"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_a_shard_index_naming_no_file_of_the_folder_is_refused(tmp_path, listing, message):
    write_hf_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(listing))
    one_line_error(lambda: load_model(tmp_path), f"model.safetensors.index.json: {message}")


@pytest.mark.parametrize("text, message", [("[]", "expected a JSON object, got list"), ("[" * 100_000, "nested too deeply"),
                                           ('{"vocab_size": ' + "9" * 5000 + "}", "invalid JSON")])
def test_a_config_that_is_not_a_json_object_is_one_line(tmp_path, text, message):
    write_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(text)
    one_line_error(lambda: load_model(tmp_path), "config.json", message)


def test_unknown_architecture(tmp_path):
    write_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: load_model(tmp_path), "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_forward_compiles_to_one_graph(tmp_path, family):
    """torch.compile sees the whole training forward as one graph: no graph breaks, no Python fallbacks."""
    write_hf_model(tmp_path, family)
    model = load_model(tmp_path)
    explanation = torch._dynamo.explain(model.hidden)(tokens(length=32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
