"""LoRA layers against hand-computed formulas, `transformers` (merged checkpoints) and `peft` (adapters both ways)."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hf_models import write_hf_model
from safetensors.torch import load_file, save_file

from clo.errors import CloError
from clo.model.config import ModelConfig
from clo.model.decoder import Transformer
from clo.model.hf_folder import load_model, save_model
from clo.model.lora import LoRALinear, apply_lora, disable_adapters, load_adapter, lora_layers, lora_state_dict, merge_lora, save_adapter

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def base_dir(tmp_path):
    write_hf_model(tmp_path / "base", "llama")
    return tmp_path / "base"


def tokens(batch=2, length=12):
    return torch.randint(3, 128, (batch, length))


def randomize_lora_B(model, std=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def lora_model(folder, targets=ALL_LINEAR, r=4, alpha=12, dropout=0.0):
    """Our model with random, non-zero adapters (so they change the output)."""
    model = load_model(folder)
    apply_lora(model, targets, r, alpha, dropout)
    randomize_lora_B(model)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_fresh_adapter_is_the_base_model(base_dir):
    base, ours = load_model(base_dir), load_model(base_dir)
    names = apply_lora(ours)
    assert names == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))  # B = 0: exactly the base model
    # the base weights are not copied, and keep their checkpoint names
    assert set(base.state_dict()) == {k for k in ours.state_dict() if ".lora_" not in k}


def test_wrapping_shares_the_weight_and_works_on_meta():
    cfg = ModelConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64,
                                   intermediate_size=96, num_hidden_layers=1, num_attention_heads=4))
    with torch.device("meta"):
        model = Transformer(cfg)
    q = model.layers[0].self_attn.q_proj
    apply_lora(model, ("q_proj",), r=2)
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight is q.weight
    assert layer.lora_A.weight.shape == (2, 64) and layer.lora_A.weight.is_meta
    assert layer.lora_B.weight.shape == (64, 2)


def test_layer_formula_and_dropout_only_on_the_lora_input():
    """h = W x + b + (alpha/r) B A dropout(x), with the same dropout mask drawn by hand."""
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=6, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5, training=True)
    expected = x @ base.weight.T + base.bias + 1.5 * dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(layer(x), layer(x)) > 1e-3  # dropout really is active in train mode
    layer.eval()
    assert max_diff(layer(x), base(x) + x @ layer.delta_weight().T) <= 1e-5  # delta includes alpha/r


def test_dropout_leaves_the_base_output_alone(base_dir):
    base, ours = load_model(base_dir), load_model(base_dir)
    apply_lora(ours, ALL_LINEAR, dropout=0.5)
    ours.train()  # B = 0, so any dropout applied to the base path would show
    x = tokens()
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))


def test_merge_unmerge(base_dir):
    base, ours = load_model(base_dir), lora_model(base_dir)
    original = ours.layers[1].mlp.down_proj.weight.clone()
    x = tokens()
    with torch.no_grad():
        unmerged = ours(x)
        assert max_diff(unmerged, base(x)) > 1e-2  # the adapters matter
        for layer in lora_layers(ours).values():
            layer.merge()
        assert max_diff(ours(x), unmerged) <= 1e-5
        assert max_diff(ours.layers[1].mlp.down_proj.weight, original) > 1e-3
        ours.layers[1].mlp.down_proj.merge()  # merging twice must not add the update twice
        assert max_diff(ours(x), unmerged) <= 1e-5
        for layer in lora_layers(ours).values():
            layer.unmerge()
        assert max_diff(ours.layers[1].mlp.down_proj.weight, original) <= 1e-6
        assert max_diff(ours(x), unmerged) <= 1e-5


def test_disable_adapters_gives_the_base_model(base_dir):
    base, ours = load_model(base_dir), lora_model(base_dir)
    x = tokens()
    with torch.no_grad():
        adapted = ours(x)
        with disable_adapters(ours):
            assert torch.equal(ours(x), base(x))
        assert torch.equal(ours(x), adapted)  # switched back on afterwards
        ours.layers[0].self_attn.q_proj.merge()
        with pytest.raises(RuntimeError, match="merged"):
            with disable_adapters(ours):
                pass


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases and tied embeddings
def test_merged_checkpoint_loads_in_transformers(tmp_path, family):
    import transformers

    write_hf_model(tmp_path / "base", family)
    ours = lora_model(tmp_path / "base")
    x = tokens()
    with torch.no_grad():
        expected = ours(x)
    assert len(merge_lora(ours)) == 2 * len(ALL_LINEAR)
    assert not lora_layers(ours) and type(ours.layers[0].self_attn.q_proj) is nn.Linear
    save_model(ours, tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "base" / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_diff(hf(x).logits, expected) <= 1e-4


def test_our_adapter_loads_in_peft(tmp_path, base_dir):
    import peft
    import transformers

    ours = lora_model(base_dir, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=12)
    save_adapter(ours, tmp_path / "adapter", base_model=str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 12, ["down_proj", "q_proj", "v_proj"])
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 12

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    x = tokens()
    with torch.no_grad():
        base_logits = hf(x).logits
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        expected = peft_model(x).logits
        assert max_diff(expected, base_logits) > 1e-2  # peft really applied the adapter
        assert max_diff(ours(x), expected) <= 1e-4


def test_peft_adapter_loads_in_ours(tmp_path, base_dir):
    import peft

    hf = write_hf_model(tmp_path / "unused", "llama")  # same seed: the weights in base_dir
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["k_proj", "o_proj", "up_proj"],
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    randomize_lora_B(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    x = tokens()
    ours = load_model(base_dir)
    names = load_adapter(ours, tmp_path / "adapter")
    wanted = ("self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj")
    assert names == [f"layers.{i}.{p}" for i in range(2) for p in wanted]
    assert ours.layers[0].mlp.up_proj.scaling == 3.0 and ours.layers[0].mlp.up_proj.dropout_p == 0.1
    with torch.no_grad():
        expected = peft_model(x).logits
        assert max_diff(expected, load_model(base_dir)(x)) > 1e-2
        assert max_diff(ours.eval()(x), expected) <= 1e-4


def test_only_lora_parameters_train(base_dir):
    ours = lora_model(base_dir)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(ours))
    assert len(trainable) == 2 * 2 * len(ALL_LINEAR) and all(".lora_" in n for n in trainable)
    ours(tokens()).logsumexp(-1).mean().backward()
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert p.grad.abs().max() > 0, name


def test_lora_state_dict_round_trip(base_dir):
    ours = lora_model(base_dir)
    state = lora_state_dict(ours)
    assert "layers.0.self_attn.q_proj.lora_A.weight" in state and "layers.0.self_attn.q_proj.weight" not in state
    fresh = load_model(base_dir)
    apply_lora(fresh, ALL_LINEAR, r=4, alpha=12)
    assert fresh.load_state_dict(state, strict=False).unexpected_keys == []
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x), ours(x))


def test_load_adapter_errors(tmp_path, base_dir):
    with pytest.raises(CloError, match="no adapter_config.json"):
        load_adapter(load_model(base_dir), tmp_path)

    save_adapter(lora_model(base_dir), tmp_path / "adapter", base_model="base")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"
    save_file({**tensors, key: torch.zeros(4, 32)}, weights)
    model = load_model(base_dir)
    with pytest.raises(CloError) as e:
        load_adapter(model, tmp_path / "adapter")
    assert key in str(e.value) and "[4, 32]" in str(e.value) and "\n" not in str(e.value)
    assert not lora_layers(model)  # a failed load leaves the model untouched

    save_file({**tensors, "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}, weights)
    with pytest.raises(CloError, match="layers.7.mlp.up_proj"):
        load_adapter(model, tmp_path / "adapter")

    save_file(tensors, weights)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    plain = json.loads(config_path.read_text())
    for field, value in (("use_dora", True), ("alora_invocation_tokens", [5, 6])):  # not plain LoRA: refused, never approximated
        config_path.write_text(json.dumps({**plain, field: value}))
        with pytest.raises(CloError, match=field):
            load_adapter(model, tmp_path / "adapter")


def test_apply_lora_errors(base_dir):
    with pytest.raises(CloError, match="match no linear layer"):
        apply_lora(load_model(base_dir), ("qkv",))
    write_hf_model(base_dir, "smollm2")  # tied embeddings: merging into lm_head would change embed_tokens too
    with pytest.raises(CloError, match="lm_head"):
        apply_lora(load_model(base_dir), ("lm_head",))


def test_lora_targets_follow_the_stage_groups():
    from clo.model.decoder import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
    from clo.train.stages import lora_targets

    assert lora_targets(["attn"]) == ATTENTION_PROJECTIONS
    assert lora_targets(["attn", "mlp"]) == lora_targets(["all"]) == ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    assert lora_targets(["mlp"]) == MLP_PROJECTIONS
    assert lora_targets(["norm"]) == ATTENTION_PROJECTIONS  # no linear layer in the group: attention, as before
