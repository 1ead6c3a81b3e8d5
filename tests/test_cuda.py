"""The CUDA paths: logits against transformers on the GPU, train.py's default GPU step (bf16 autocast,
compiled blocks, fused AdamW) and the CUDA-graph decode. Skipped where no GPU is visible (CI);
run on a GPU machine with `python -m pytest -q tests/test_cuda.py` (bench/gpu_check.sh does).
"""

import json

import pytest
import torch
from hf_models import write_hf_model
from safetensors.torch import load_file
from tiny_chat_model import make_tiny_training_setup

import train
from clo.model.generate import generate
from clo.model.hf_folder import load_model
from clo.train.stages import group_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[5, 9, 17, 33, 4], [7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_training_setup(tmp_path_factory.mktemp("tiny"))


def run(tiny, out, *extra):
    folder, data = tiny
    return train.main(["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "4",
                       "--device", "cuda", "--show-answers", "0", *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers_on_cuda(tmp_path, family):
    """fp32 to 1e-4 (as on CPU); bf16 no further from transformers' fp32 than transformers' own bf16 is."""
    hf = write_hf_model(tmp_path, family).cuda()
    x = torch.randint(3, 128, (2, 24), device="cuda")
    with torch.no_grad():
        expected = hf(x).logits
        assert (load_model(tmp_path, "cuda", torch.float32)(x) - expected).abs().max().item() <= 1e-4
        ours_bf16 = load_model(tmp_path, "cuda", torch.bfloat16)(x).float()
        theirs_bf16 = hf.to(torch.bfloat16)(x).logits.float()
    ours_err = (ours_bf16 - expected).abs().max().item()
    theirs_err = (theirs_bf16 - expected).abs().max().item()
    assert ours_err <= 2 * theirs_err + 1e-3, (ours_err, theirs_err)


def test_default_gpu_step_trains_only_attention(tiny, tmp_path):
    """train.py's CUDA defaults (bf16 autocast, bf16 frozen weights, compiled blocks, fused AdamW)."""
    out = run(tiny, tmp_path / "run", "--max-steps", "3", "--lr", "1e-3")
    rows = metrics(out)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["compile"] == "auto" and run_json["summary"]["peak_memory_gib"] > 0
    # --dtype auto holds frozen weights in bf16 on CUDA; the fp32 checkpoint stays their master copy,
    # so they are saved bit for bit, and only the attention weights moved.
    before, after = load_file(tiny[0] / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(t.bfloat16().float(), t) for t in before.values())  # bf16 rounding would show
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == (group_of(key.removeprefix("model.")) == "attn"), key


def test_head_logits_are_not_rounded_to_bf16():
    """response_logps on CUDA with bf16 hidden states and head: the log-probs and gradients of an fp32
    computation over the same bf16 values, to fp32 rounding (the logits are not rounded to bf16)."""
    from clo.train.loss import response_logps

    torch.manual_seed(0)
    B, T, D, V = 3, 40, 64, 1000
    h = (torch.randn(B, T, D, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda") * 0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :10] = -100
    got, _ = response_logps(h, w, labels, chunk_size=32)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want, _ = response_logps(h32, w32, labels, chunk_size=32)
    # sums of 30 log-probs near -250: rounding the logits to bf16 puts them 0.04 off (measured on CPU)
    assert (got - want).abs().max().item() < 4e-3
    got.sum().backward()
    want.sum().backward()
    assert torch.allclose(h.grad.float(), h32.grad, rtol=2e-2, atol=2e-2)
    assert torch.allclose(w.grad.float(), w32.grad, rtol=2e-2, atol=2e-2)


def test_multiple_choice_letters_are_scored_from_fp32_logits(tmp_path):
    """eval's one-token multiple choice on a bf16 model: the letters' log-probs of fp32 logits over the same bf16
    hidden states (as training's head computes them), not of logits rounded to bf16."""
    from clo.eval.mc import next_letter_logps

    write_hf_model(tmp_path, "llama")
    model = load_model(tmp_path, "cuda", torch.bfloat16)
    batch = [([5, 9, 17, 33, 4], [[40], [41], [42], [43]]), ([7, 8], [[40], [41], [42], [43]])]
    got = next_letter_logps(model, batch, 0)
    with torch.no_grad():
        hidden = model.hidden(torch.tensor([[5, 9, 17, 33, 4], [7, 8, 0, 0, 0]], device="cuda"))
        last = hidden[torch.arange(2), torch.tensor([4, 1])].float()
        want = torch.log_softmax(last @ model.lm_head.weight.float().T, dim=-1)[:, 40:44].cpu()
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("option", [("--checkpoint-activations",), ("--compile", "on")], ids=["checkpointing", "compiled-blocks"])
def test_speed_options_train_the_same_on_cuda(tiny, tmp_path, option):
    """As tests/test_train.py's CPU test: fp32, the metrics of 3 steps match the plain eager run."""
    args = ("--max-steps", "3", "--lr", "1e-3", "--amp", "off", "--dtype", "float32")
    plain = run(tiny, tmp_path / "plain", *args, "--compile", "off")
    other = run(tiny, tmp_path / "other", *args, *option)
    for a, b in zip(metrics(plain), metrics(other), strict=True):
        for key in ("loss", "nll", "margin", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(tmp_path, dtype):
    """compile=True runs the decode step as a CUDA graph (no skips), call after call (one graph per batch size).

    fp32: the tokens equal the eager decode's. bf16: the compiled kernels round differently, so a
    random tiny model's near-ties may break the other way; the tokens must be well-formed and stable.
    """
    from torch._dynamo.utils import counters

    write_hf_model(tmp_path, "llama")
    model = load_model(tmp_path, "cuda", dtype)
    counters.clear()
    try:
        for prompts, n in ((PROMPTS, 9), ([[3, 4, 5], [6] * 9, [11, 12]], 12), (PROMPTS, 6)):
            compiled = generate(model, prompts, max_new_tokens=n, stop_ids=set(), compile=True)
            assert all(len(row) == n for row in compiled)
            assert generate(model, prompts, max_new_tokens=n, stop_ids=set(), compile=True) == compiled
            if dtype == torch.float32:
                assert compiled == generate(model, prompts, max_new_tokens=n, stop_ids=set())
    finally:
        model.clear_cache()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.mark.parametrize("compile", ["off", "on"])  # on: flex_attention traced inside each compiled block
def test_packed_kernels_train_as_the_dense_mask_does(tiny, tmp_path, compile):
    """Packed rows on CUDA: FlexAttention (the auto kernel there) and, uncompiled, the gathered calls (the
    CPU's kernel) vs SDPA with the dense mask, fp32: the same losses, gradient norms and weights up to rounding."""
    args = ("--max-steps", "3", "--lr", "1e-3", "--amp", "off", "--dtype", "float32", "--packing", "on", "--compile", compile, "--save-every", "0")
    kinds = ("sdpa", "flex", "gathered") if compile == "off" else ("sdpa", "flex")
    runs = {kind: run(tiny, tmp_path / kind, *args, "--attention", kind) for kind in kinds}
    wb = load_file(runs["sdpa"] / "model" / "model.safetensors")
    for kind in kinds[1:]:
        for a, b in zip(metrics(runs[kind]), metrics(runs["sdpa"]), strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (kind, a, b)
        wa = load_file(runs[kind] / "model" / "model.safetensors")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-3, kind


def test_compiled_beam_search_is_a_cuda_graph_with_the_eager_outputs(tmp_path):
    """translate.py's decoding on CUDA (clo/translate/static_decode.py): the beam step compiled in static
    shapes runs as a CUDA graph (no skips), in fp32 gives the eager beam search's outputs, and a second
    batch of the same shape reuses the buffers and the graph."""
    from test_m2m100 import random_batch, write_tiny_m2m100
    from torch._dynamo.utils import counters

    from clo.translate.m2m100 import load_m2m100
    from clo.translate.search import GenerationSettings
    from clo.translate.search import generate as translate

    write_tiny_m2m100(tmp_path, vocab_size=64)
    model = load_m2m100(tmp_path, "cuda", torch.float32)
    settings = GenerationSettings(num_beams=4, max_length=20, early_stopping=True)
    counters.clear()
    for seed in (1, 2, 3):
        src, mask = (t.cuda() for t in random_batch(64, seed))
        assert translate(model, src, mask, 10, settings, compile=True) == translate(model, src, mask, 10, settings)
    assert len(model._static_decode_buffers) == 2
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
