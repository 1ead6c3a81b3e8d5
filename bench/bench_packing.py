"""Packed, prefix-shared rows vs padded length groups: the same CLO steps, examples per second.

    python bench/bench_packing.py                          # the default model, the sw demo pairs, CPU, --amp auto
    python bench/bench_packing.py --mix alpaca --steps 6   # Alpaca's English lengths (../shared/data)

Layouts: `padded` (train.py's --packing off: length groups), `packed` (train.py's CPU default:
every segment in one row, attention per sequence, `--attention gathered`), `packed-rows` (the same
kernel over rows as long as the longest segment, the default before one row) and `packed-dense`
(such rows, one SDPA call per row with a dense mask, `--attention sdpa`).

One process, one model, the same micro-batches through every layout, each going first in turn
(a slow moment of the machine hits both), at learning rate 0 so both see the same weights and
must give the same losses. Work is counted as examples per second (computing fewer tokens for the
same examples counts as faster); also the tokens each layout computes (padding and repeated prompts
included) and the real tokens of the four sequences per second.

Mixes: `demo` is the real sw demo pairs (data/demo/sw.jsonl). `alpaca` takes the 5,000 English
Alpaca examples (prompt = instruction + input) tokenized with the model's chat format, and gives
each a target side of random tokens of the same lengths: speed depends on lengths, not on words.
"""

import argparse
import json
import random
import statistics
import time

import torch
from common import bench_device, machine, write_results  # puts clo on sys.path
from workload import alpaca_examples, describe

from clo.model.chat import detect_format
from clo.model.hf_folder import load_model
from clo.model.sources import DEFAULT_MODEL, resolve_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs
from clo.train.batching import EncodedExample, encode_all, flat_sequences, round_up
from clo.train.precision import training_precision
from clo.train.scoring import Batching, length_groups
from clo.train.stages import begin_stage
from clo.train.step import Objective, optimizer_step


def computed_tokens(batch: list[EncodedExample], batching: Batching) -> int:
    """Tokens one layout runs through the model for `batch` (padding and repeated prompts included)."""
    seqs = flat_sequences(batch)
    if batching.packing:
        return batching.pack(seqs).tokens.numel()
    lengths = [len(p) + len(r) for p, r in seqs]
    return sum(round_up(max(lengths[i] for i in g), batching.bucket) * len(g) for g in length_groups(lengths, batching.groups))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--mix", choices=["demo", "alpaca"], default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (train.py's default)")
    p.add_argument("--steps", type=int, default=4, help="steps per layout, each on a new batch")
    p.add_argument("--groups", type=int, default=4, help="length groups of the padded side (train.py's CPU default)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast, as train.py's --amp (auto: where bf16 is fast)")
    p.add_argument("--json", help="where the results go (default runs/bench/packing-<mix>-<device>.json)")
    args = p.parse_args()
    device = bench_device(args.device)
    folder = resolve_model(args.model)
    tok = load_tokenizer(folder)
    fmt = detect_format(tok, "auto")
    if args.mix == "demo":
        examples, _ = encode_all(tok, fmt, load_pairs(demo_path("sw")).examples, args.max_length)
    else:
        examples = alpaca_examples(tok, fmt, args.max_length)
    random.Random(0).shuffle(examples)
    if len(examples) < args.steps * args.batch_size:
        raise SystemExit(f"error: {len(examples)} examples: too few for --steps {args.steps} x --batch-size {args.batch_size}")

    precision = training_precision(device, "auto", args.amp)
    model = load_model(folder, device, precision.frozen)
    optimizer, trainable, _ = begin_stage(model, ["attn"], lora=False, lr=0.0, weight_decay=0.0, compile=False,
                                          checkpoint_activations=False, source=folder, trained=set())
    layouts = {"padded": Batching(tok.pad_id, 8, args.groups),
               "packed": Batching(tok.pad_id, 8, args.groups, packing=True, attention="gathered", one_row=True),
               "packed-rows": Batching(tok.pad_id, 8, args.groups, packing=True, attention="gathered"),
               "packed-dense": Batching(tok.pad_id, 8, args.groups, packing=True, attention="sdpa")}
    names = list(layouts)
    times, losses, computed = ({name: [] for name in layouts} for _ in range(3))
    real = 0
    for i in range(args.steps + 1):  # step 0 warms up, untimed
        batch = examples[i * args.batch_size : (i + 1) * args.batch_size]
        if i:
            real += sum(len(x) + len(y) for ex in batch for x, y in ex.sequences)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each layout first in turn
            t = time.perf_counter()
            row, _ = optimizer_step(model, optimizer, trainable, [(batch, torch.zeros(len(batch), 4))], 0.0, Objective(), layouts[name], precision, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t)
                losses[name].append(row["loss"])
                computed[name].append(computed_tokens(batch, layouts[name]))
    results = {}
    for name in layouts:
        total = sum(times[name])
        results[name] = {"step_s": times[name], "median_step_s": statistics.median(times[name]), "examples_per_s": args.steps * args.batch_size / total,
                         "real_tokens_per_s": real / total, "computed_tokens": sum(computed[name]), "losses": losses[name]}
    speedup = {name: results[name]["examples_per_s"] / results["padded"]["examples_per_s"] for name in names[1:]}
    gap = max(abs(a - b) for name in names[1:] for a, b in zip(losses["padded"], losses[name]))
    print(f"work: {args.mix}, {len(examples)} examples, lengths {json.dumps(describe(examples))}")
    for name, r in results.items():
        print(f"{name:<12} steps {[round(t, 2) for t in r['step_s']]} s: {r['examples_per_s']:.3f} examples/s, "
              f"{r['real_tokens_per_s']:.0f} real tokens/s, {r['computed_tokens']} tokens computed")
    for name in names[1:]:
        print(f"{name} / padded: {speedup[name]:.3f}x examples/s, {results[name]['computed_tokens'] / results['padded']['computed_tokens']:.3f}x the tokens")
    one_row = results["packed"]["examples_per_s"] / results["packed-rows"]["examples_per_s"]
    print(f"packed / packed-rows (one row vs rows, the same kernel): {one_row:.3f}x examples/s, "
          f"{results['packed']['computed_tokens'] / results['packed-rows']['computed_tokens']:.3f}x the tokens")
    print(f"largest loss difference from padded: {gap:.3g}")
    write_results(args.json, f"packing-{args.mix}-{device.type}", {"machine": machine(), "settings": vars(args), "lengths": describe(examples),
                                                                    "results": results, "speedup": speedup,
                                                                    "one_row_vs_rows": one_row, "loss_gap": gap})


if __name__ == "__main__":
    main()
