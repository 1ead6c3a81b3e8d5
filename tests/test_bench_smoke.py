"""The benchmark scripts stay runnable at a tiny size: bench/bench_train.py, bench_generate.py, bench_fsdp_world1.py, bench_packing.py, bench_shapes.py.

CPU only: the CUDA paths (max_memory_allocated, fused AdamW, torch.compile, the sequential mode for
two 7B workers) cannot run here. The random-weights path that `--device cuda` uses by default is
checked on CPU with the `random:tiny` shape.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_chat_model import demo_texts, make_tiny_chat_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clo.model.config import ModelConfig
from clo.model.decoder import Transformer
from clo.train.batching import EncodedExample
from clo.train.scoring import Batching
from clo.train.stages import set_trainable
from clo.train.step import Objective, batch_loss

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
import workload  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny ChatML model whose tokenizer was trained on the Swahili demo set."""
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"), demo_texts("sw"))


def run_script(script: str, *argv: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLO_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *argv], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_stretch_tiles_responses_to_the_length():
    """Hand-worked: prompts 3 and 5 tokens, bodies 4 and 2 tokens + end-of-turn 9; length 12.

    Room for a body: 12 - 1 - prompt = 8 (x_en) and 6 (x_t); scale = min(8/4, 8/2, 6/2, 6/4) = 1.5,
    so bodies become 6 and 3 tokens: lengths 3+6+1 = 10, 3+3+1 = 7, 5+3+1 = 9, 5+6+1 = 12.
    """
    en, t = [1, 2, 3], [4, 5, 6, 7, 8]
    y_en, y_t = [10, 11, 12, 13, 9], [20, 21, 9]
    ex = EncodedExample("x", [(en, y_en), (en, y_t), (t, y_t), (t, y_en)])
    out = workload.stretch(ex, 12)
    assert out.sequences == [
        (en, [10, 11, 12, 13, 10, 11, 9]),
        (en, [20, 21, 20, 9]),
        (t, [20, 21, 20, 9]),
        (t, [10, 11, 12, 13, 10, 11, 9]),
    ]
    assert out.longest == 12
    assert workload.stretch(ex, 8).longest == 8  # shorter than the example: bodies are cut, not dropped


def test_step_flops_match_pytorchs_flop_counter():
    """`step_flops` against torch's FlopCounterMode on the real step (clo.train.step.batch_loss + backward).

    The counter sees what runs, the formula counts what a step needs; they differ by exactly two
    known terms: layer 0's q/k/v need no input gradient (the embedding is frozen), and the chunked
    head recomputes its logits in backward (one more 2·V·D per response token).
    """
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)
    cfg = ModelConfig.from_hf(hf)
    model = Transformer(cfg)
    set_trainable(model, ("attn",))
    prompt, response = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12]  # equal lengths: no padding to count
    batch = [EncodedExample("a", [(prompt, response)] * 4), EncodedExample("b", [(prompt, response)] * 4)]
    ref = torch.zeros(2, 4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # the math path is plain matmuls
        loss, _ = batch_loss(model, batch, ref, Objective(), Batching(pad_id=0, bucket=1, groups=1))
        loss.backward()
    n, r, sequences = len(prompt) + len(response), len(response), 8
    qkv_0 = cfg.dim * cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
    head = cfg.vocab_size * cfg.dim
    expected = workload.step_flops(cfg, batch) - sequences * (2 * qkv_0 * n - 2 * head * r)
    assert counter.get_total_flops() == expected


def test_random_shapes_give_both_sides_the_same_weights():
    """`random:<shape>` (the CUDA default) builds clo and transformers models with identical logits."""
    spec = {"model": "random:tiny"}
    ours = common.clo_model(spec, torch.device("cpu"), torch.float32)
    theirs = common.hf_model(spec, torch.device("cpu"), torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-5)


def test_bench_train_runs_every_side_on_the_same_tokens(tiny, tmp_path):
    pytest.importorskip("trl")  # the peer: requirements-dev.txt
    out = tmp_path / "train.json"
    result = run_script("bench_train.py", "--model", str(tiny), "--lengths", "64", "--batch-sizes", "1", "--warmup", "1",
                        "--rounds", "2", "--steps", "1", "--threads", "1", "--sides", "clo", "clo-padded", "trl",
                        "--json", str(out), cache=tmp_path / "cache")
    assert "| 64 | 1 |" in result.stdout and "clo-padded/trl ex/s" in result.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_tokens"] is True  # TRL's collator counted exactly clo's non-padding tokens
    assert row["padded_length"] == 64
    for side in ("clo", "clo-padded", "trl"):
        r = row[side]
        assert r["timed_steps"] == 2 and r["examples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["amp"] == row["clo"]["amp"], r
        assert 0 < r["baseline_bytes"] <= r["peak_bytes"], r  # the peak covers the steps, after the reset
    assert row["clo"]["packing"] is True and row["clo-padded"]["packing"] is False  # train.py's CPU default, and --packing off


def test_alpaca_mix_keeps_lengths_within_the_cap(tiny, shared_data):
    """The Alpaca work: English prompt and answer from the file, a target side of the same lengths,
    every example within the cap, the same batches on every call (each worker builds its own)."""
    spec = {"tokenizer": str(tiny), "mix": "alpaca", "length": 96, "batch": 3, "n_batches": 2, "vocab_size": 512}
    batches, pad_id = workload.bench_batches(spec)
    again, _ = workload.bench_batches(spec)
    assert [[ex.sequences for ex in b] for b in batches] == [[ex.sequences for ex in b] for b in again]
    examples = [ex for b in batches for ex in b]
    assert [len(b) for b in batches] == [3, 3] and len({ex.id for ex in examples}) == 6
    for ex in examples:
        (x_en, y_en), (x_en2, y_t), (x_t, y_t2), (x_t2, y_en2) = ex.sequences
        assert x_en == x_en2 and x_t == x_t2 and y_t == y_t2 and y_en == y_en2  # two prompts, two answers each
        assert len(x_t) == len(x_en) and len(y_t) == len(y_en) and x_t != x_en
        assert ex.longest <= 96 and max(max(p + r) for p, r in ex.sequences) < 512
    assert 0 <= pad_id < 512
    stats = workload.describe(examples)
    assert stats["x_en"] == stats["x_t"] and stats["y_en"]["max"] <= 96


def test_bench_shapes_counts_the_epochs_distinct_batch_shapes(tiny, shared_data, tmp_path):
    done = run_script("bench_shapes.py", "--tokenizer", str(tiny), "--max-length", "96", "--batch-size", "4", cache=tmp_path / "cache")
    batches = int(re.search(r"(\d+) batches of 4", done.stdout).group(1))
    found = re.findall(r"^ +(\w+) +(\d+) distinct shapes .*, ([\d.]+) tokens computed per real token$", done.stdout, re.M)
    counts = {name: int(n) for name, n, _ in found}
    per_real = {name: float(t) for name, _, t in found}
    assert set(counts) == {"packed", "packed_rows", "padded"}, done.stdout
    assert all(1 <= n <= batches for n in counts.values()) and counts["padded"] <= 96 // 64 + 1  # 4 x 4 rows, two length buckets at most
    assert per_real["padded"] >= 1  # padding only adds


def test_bench_generate_matches_transformers_tokens(tiny, tmp_path):
    out = tmp_path / "generate.json"
    run_script("bench_generate.py", "--model", str(tiny), "--batch-sizes", "1", "3", "--new-tokens", "6", "--runs", "1",
               "--threads", "1", "--json", str(out), cache=tmp_path / "cache")
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["same_tokens"] == 1.0  # greedy, fp32: the same ids as transformers
        for side in ("clo", "transformers"):
            assert row[side]["lengths_ok"] and row[side]["decode_tokens_per_s"] > 0


def test_bench_fsdp_world1_steps_equal_the_plain_steps(tiny, tmp_path):
    """FSDP2 over one process computes train.py's plain step (fp32: the same loss and gradient norm,
    step after step; Adam hides a wrongly scaled gradient from the loss, not from the norm)."""
    out = tmp_path / "fsdp.json"
    run_script("bench_fsdp_world1.py", "--model", str(tiny), "--batch-size", "2", "--steps", "2", "--json", str(out), cache=tmp_path / "cache")
    result = json.loads(out.read_text())
    plain, fsdp = result["results"]["plain"]["losses"], result["results"]["fsdp2"]["losses"]
    assert len(plain) == len(fsdp) == 3 and plain[0] != plain[-1]  # the weights moved
    assert result["loss_gap"] <= 1e-6, (plain, fsdp)
    assert result["grad_norm_gap"] <= 1e-5, result["results"]


def test_bench_packing_same_losses_fewer_tokens(tiny, tmp_path):
    out = tmp_path / "packing.json"
    run_script("bench_packing.py", "--model", str(tiny), "--batch-size", "3", "--steps", "2", "--amp", "off", "--json", str(out), cache=tmp_path / "cache")
    result = json.loads(out.read_text())
    padded, packed, rows, dense = (result["results"][k] for k in ("padded", "packed", "packed-rows", "packed-dense"))
    assert result["loss_gap"] <= 1e-5 and len(packed["losses"]) == len(rows["losses"]) == len(dense["losses"]) == 2  # fp32: the padded losses
    assert rows["computed_tokens"] == dense["computed_tokens"] < padded["computed_tokens"]  # prompts computed once
    assert packed["computed_tokens"] < rows["computed_tokens"]  # one row: no row tails
    assert set(result["lengths"]) == {"x_en", "y_en", "x_t", "y_t"}


def test_bench_attention_times_each_kernel_in_both_dtypes(tmp_path):
    out = tmp_path / "attention.json"
    run_script("bench_attention.py", "--part", "kernel", "--lengths", "16", "32", "--repeats", "1", "--json", str(out), cache=tmp_path / "cache")
    rows = json.loads(out.read_text())["kernel"]
    assert [(r["dtype"], r["T"]) for r in rows] == [("float32", 16), ("float32", 32), ("bfloat16", 16), ("bfloat16", 32)]
    assert all(r["mask_us_per_token"] > 0 and r["causal_us_per_token"] > 0 for r in rows)


def test_gpu_check_runs_the_parts_named_translation_on_cpu(tmp_path):
    """bench/gpu_check.sh translate, as a CPU dry run on the tiny M2M100 shape: only that part runs, and
    clo's beam search and transformers' generate give the same sentences (fp32), with a rate for each."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "DEVICE": "cpu",
           "WHEELS": "", "CLO_CACHE": str(tmp_path / "cache"), "TRANSLATE_ARGS": f"--shape tiny --folder {tmp_path / 'm2m100'} --beams 3 1 "
           "--batch-size 2 --batches 1 --repeats 1 --max-length 8 --threads 1"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "translate"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "=== translate: exit 0" in result.stdout, result.stdout[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["machine.txt", "translate.json", "translate.log"]
    rows = json.loads((tmp_path / "out" / "translate.json").read_text())["rows"]
    assert [r["beams"] for r in rows] == [3, 1]
    for row in rows:
        assert row["same_output"] is True
        assert row["sentences_per_s"]["clo"] > 0 and row["sentences_per_s"]["transformers"] > 0
