"""What FSDP2 costs by itself: train.py's step with the model sharded over one process vs not sharded.

    python bench/bench_fsdp_world1.py                                  # default model, CPU, fp32
    python bench/bench_fsdp_world1.py --device cuda --model random:llama2-7b --steps 6

One process holds two copies of the model: one as train.py's one-process path holds it (frozen
weights in the precision policy's dtype), one under `fully_shard` at world size 1 (all in fp32, bf16
compute on CUDA), exactly as train.py shards over N processes. The same micro-batch of demo
examples (random tokens of the demo's lengths for a random model) goes through both, the order
alternating every step, so a slow moment of the machine hits both sides alike. Reported: median
step time (after a warm-up step), the ratio, and on CUDA the peak memory of each: the peak over its
warm-up step less what the other side holds all along (its weights and AdamW state), since both live
in one process.

This is why `torchrun --nproc-per-node 1` does not shard (clo/train/distributed.py): at world size
1, every all-gather and reduce-scatter is a copy of every weight and gradient, for nothing.
"""

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import bench_device, clo_model, machine, resolve_models, sync, write_results  # puts clo on sys.path

from clo.model.chat import detect_format
from clo.model.sources import DEFAULT_MODEL
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs
from clo.train.batching import EncodedExample, encode_all
from clo.train.distributed import shard
from clo.train.precision import training_precision
from clo.train.scoring import Batching
from clo.train.stages import begin_stage
from clo.train.step import Objective, optimizer_step
from clo.world import World


def demo_batch(spec: str, tokenizer: str, batch_size: int, vocab: int):
    """batch_size demo examples as four sequences each: tokenized by the model's tokenizer, or, for a
    random model, random ids with the same lengths (speed depends on lengths, not words)."""
    pairs = load_pairs(demo_path("sw")).examples
    tok = load_tokenizer(Path(tokenizer))
    examples, _ = encode_all(tok, detect_format(tok, "auto"), pairs, 512)
    examples = examples[:batch_size]
    if spec.startswith("random:"):
        g = torch.Generator().manual_seed(0)
        ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
        examples = [EncodedExample(ex.id, [(ids(len(p)), ids(len(r))) for p, r in ex.sequences]) for ex in examples]
    return examples, tok.pad_id


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def resident_bytes(model, optimizer) -> int:
    """What a side holds between its steps: its weights (this process's shards under FSDP2) and its AdamW state."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in model.parameters()]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def profile_steps(step, sides) -> None:
    """One step per side under torch.profiler: total self CPU time and the operators that take most."""
    from torch.profiler import ProfilerActivity, profile

    for name in sides:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(name)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        print(f"{name}: self CPU {total:.2f} s; " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} s" for e in top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="an HF folder, the default model, or random:<shape> (bench/common.py)")
    p.add_argument("--tokenizer", help="tokenizer folder for a random model (default: the default model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (train.py's default)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side, after one warm-up step each")
    p.add_argument("--json", help="where the results go (default runs/bench/fsdp-world1-<device>.json)")
    p.add_argument("--profile", action="store_true", help="then one more step per side under torch.profiler: self CPU time, top operators")
    args = p.parse_args()
    device = bench_device(args.device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or free_port(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(0, 1, 0, True)

    model_spec, tokenizer = resolve_models(args.model, args.tokenizer)
    source = None if model_spec.startswith("random:") else Path(model_spec)
    sides = {}
    held = training_precision(device, "auto", "auto").frozen  # both sides start from the same values, in this dtype
    for name in ("plain", "fsdp2"):
        precision = training_precision(device, "auto", "auto", sharded=name == "fsdp2")
        # shard() widens every weight to fp32 exactly; a random model built in fp32 would start the fp32 masters off
        # the bf16 grid, where AdamW's 1e-6 steps change the bf16 compute copy far sooner than from bf16 values
        model = clo_model({"model": model_spec}, device, held)
        if name == "fsdp2":
            shard(model, world, precision.gathered)
        optimizer, trainable, _ = begin_stage(model, ["attn"], lora=False, lr=1e-6, weight_decay=0.0, compile=False,
                                              checkpoint_activations=False, source=source, trained=set())
        sides[name] = (model, optimizer, trainable, precision, world if name == "fsdp2" else World())
    examples, pad_id = demo_batch(model_spec, tokenizer, args.batch_size, sides["plain"][0].cfg.vocab_size)
    batch = [(examples, torch.zeros(len(examples), 4))]
    batching = Batching.resolve(pad_id, 0, 0, device, False)

    losses = {name: [] for name in sides}  # the same batch and weights on both sides: the same numbers, step by step
    norms = {name: [] for name in sides}

    def step(name: str) -> float:
        model, optimizer, trainable, precision, w = sides[name]
        sync(device)
        t = time.perf_counter()
        row, _ = optimizer_step(model, optimizer, trainable, batch, 1e-6, Objective(), batching, precision, 1.0, w)
        sync(device)
        losses[name].append(row["loss"])
        norms[name].append(row["grad_norm"])
        return time.perf_counter() - t

    times = {name: [] for name in sides}
    peak = {}
    for name in sides:
        other = resident_bytes(*sides["fsdp2" if name == "plain" else "plain"][:2])  # in memory all along, not this side's
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(name)  # warm-up
        peak[name] = (torch.cuda.max_memory_allocated() - other) / 2**30 if device.type == "cuda" else None
    for i in range(args.steps):
        for name in ("plain", "fsdp2") if i % 2 == 0 else ("fsdp2", "plain"):
            times[name].append(step(name))
    if args.profile:
        profile_steps(step, sides)
    tokens = sum(len(p) + len(r) for ex in examples for p, r in ex.sequences)
    results = {name: {"step_s": t, "median_step_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "peak_gib": peak[name],
                      "losses": losses[name], "grad_norms": norms[name]} for name, t in times.items()}
    ratio = results["fsdp2"]["median_step_s"] / results["plain"]["median_step_s"]
    for name, r in results.items():
        memory = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"{name:<6} steps {[round(t, 2) for t in r['step_s']]} s, median {r['median_step_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s{memory}")
    gap = max(abs(a - b) for a, b in zip(losses["plain"], losses["fsdp2"]))
    norm_gap = max(abs(a - b) / a for a, b in zip(norms["plain"], norms["fsdp2"]))
    print(f"FSDP2 at world size 1 / plain: {ratio:.3f}x; over the {len(losses['plain'])} steps, largest difference of the loss {gap:.3g}, "
          f"of the gradient norm {norm_gap:.3g} (relative)")
    write_results(args.json, f"fsdp-world1-{device.type}", {"machine": machine(), "settings": vars(args), "results": results, "ratio": ratio, "loss_gap": gap, "grad_norm_gap": norm_gap})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
