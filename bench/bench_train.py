"""Training-step speed and memory: clo's CLO step vs TRL's DPOTrainer on the same tokens.

    python bench/bench_train.py                  # CPU table on SmolLM2-135M-Instruct (about 10 min on 2 cores)
    python bench/bench_train.py --device cuda    # Llama-2-7B shape, random bf16 weights, sequence 1024, MFU
    python bench/bench_train.py --lengths 128 --batch-sizes 1 --warmup 1 --rounds 1 --steps 1   # a quick look
    python bench/bench_train.py --mix alpaca --sides clo clo-padded trl --batch-sizes 8 --warmup 1 --rounds 2 --steps 3
                                                 # Alpaca's spread of lengths, capped at 512: examples/s of all three

One step on both sides: B examples = 4B sequences (clo/train/batching.py: x_en→y_en, x_en→y_t, x_t→y_t,
x_t→y_en), forward, backward, gradient clipping, AdamW over the attention projections only.

- clo (here): the step of train.py itself (`clo.train.step.optimizer_step`, its collate and loss),
  wired as train.py wires it: `training_precision` for the dtype and autocast, `--compile auto`,
  `Batching.resolve` for the bucket, length groups and packing, `begin_stage` over the attention, `lr_at`;
  on train.py's defaults, changed only by `--clo-flags` (`CLO_FLAGS`). Timed from collate to `zero_grad`.
  `clo-padded`: the same with `--packing off` (padded length groups instead of packed, prefix-shared rows).
- TRL (bench/trl_peer.py): `DPOTrainer` with `loss_type=["sigmoid", "sft"]`, `loss_weights=[1-λ, λ]`,
  reference log-probs precomputed, only q/k/v/o trainable, the same weights, fed the very token ids
  clo uses (each TRL batch of 2B pairs is the same [4B, T] tokens). Timed between consecutive
  `on_step_end` callbacks inside `trainer.train()`: its fetch, collate, step and logging.

Work (bench/workload.py, `--mix`): `stretched`: each demo example's responses are tiled (or cut) by
one common factor until its longest sequence is exactly the sequence length, so the four lengths keep
their natural ratios and the batch keeps its natural padding; `alpaca`: Alpaca's 5,000 English examples
with random target sides of the same lengths, those within the length (a cap here), shuffled once.
Work is counted as examples/s (all timed examples / all timed seconds: computing fewer tokens for the
same examples counts as faster) and tokens/s (median over steps of the non-padding tokens of the four
sequences / step time). Reference log-probs are computed before timing, on every side.

Each side runs in its own worker process, so its memory is its own: peak RSS (VmHWM, reset just
before the first warm-up step, so the warm-up counts; the interpreter and imported libraries included) on CPU,
`torch.cuda.max_memory_allocated` (reset likewise) on CUDA; the JSON also has the memory in use at
the reset (`baseline_bytes`: weights, libraries, no optimizer state yet). On CPU the parent alternates the
workers round by round (clo, TRL, clo, TRL, ...) after each has warmed up; tokens/s is the median
over all timed steps. On CUDA the two run one after the other (a 7B pair does not fit one card).
MFU = the step's FLOPs (`step_flops`) / time / this device's measured matmul rate in the compute
dtype (`matmul_rate`). Results go to a markdown table and a JSON file.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from common import RANDOM_SHAPES, bench_device, clo_model, machine, model_config, model_name, resolve_models, sync, write_results
from trl_peer import NOTES, trl_worker
from workload import MIXES, bench_batches, describe, final_memory, matmul_rate, precision_policy, start_peak, step_flops

from clo.errors import ArgumentParser, CloError, run_cli
from clo.runtime import bf16_is_fast, on_for_cuda, resolve_device
from clo.train.batching import count_tokens
from clo.train.precision import check_precision_flags
from clo.train.reference import compute_reference_logps
from clo.train.schedule import lr_at
from clo.train.scoring import Batching
from clo.train.stages import begin_stage
from clo.train.step import Objective, optimizer_step

SIDES = ("clo", "clo-padded", "trl")


# --- the clo side: train.py's step on train.py's defaults --------------------------------------


def clo_flags_parser() -> argparse.ArgumentParser:
    """The train.py flags --clo-flags may change, with train.py's defaults (both sides read them)."""
    p = ArgumentParser(prog="--clo-flags", add_help=False, allow_abbrev=False)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--bucket", type=int, default=0)
    p.add_argument("--length-groups", type=int, default=0)
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--attention", choices=["auto", "sdpa", "gathered", "flex"], default="auto")
    p.add_argument("--lr", type=float, default=8e-6)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=0.5)
    return p


CLO_FLAGS = tuple(a.option_strings[0] for a in clo_flags_parser()._actions)


def parse_clo_flags(text: str) -> dict:
    """--clo-flags '--compile on ...' -> every supported flag's value; CloError for any other train.py flag."""
    flags, unknown = clo_flags_parser().parse_known_args(text.split())
    if unknown:
        raise CloError(f"--clo-flags: {unknown[0]!r} is not supported here; supported: {' '.join(CLO_FLAGS)}")
    if flags.bucket < 0 or flags.length_groups < 0:
        raise CloError("--clo-flags: --bucket and --length-groups must be 0 (auto) or more")
    check_precision_flags(flags.dtype, flags.amp)
    return vars(flags)


def worker(side: str, conn, spec: dict) -> None:
    """Process entry point: set up `side`, answer ("run", n) with n steps' times, ("stop",) with peak memory."""
    sys.stdout = sys.stderr  # stdout belongs to the parent's table (Trainer prints its logs there)
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if side == "clo-padded":
            spec = {**spec, "clo": {**spec["clo"], "packing": "off"}}
        (trl_worker if side == "trl" else clo_worker)(conn, spec)  # trl_peer imports TRL only in its own worker
    except BaseException as e:  # the parent prints it in the table instead of hanging on a dead pipe
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        conn.send({"error": "out of memory" if oom else f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    finally:
        conn.close()


def clo_worker(conn, spec: dict) -> None:
    """The step of train.py, wired as train.py's `train` wires it, for this batch size and length."""
    t0 = time.perf_counter()
    flags = argparse.Namespace(**spec["clo"])
    device = resolve_device(spec["device"])
    precision = precision_policy(device, spec["clo"])  # training_precision(device, --dtype, --amp)
    compiled = on_for_cuda(flags.compile, device)
    objective = Objective("clo", beta=flags.beta, lam=flags.lam)
    batches, pad_id = bench_batches(spec)
    batching = Batching.resolve(pad_id, flags.bucket, flags.length_groups, device, compiled, flags.packing, flags.attention)
    model = clo_model(spec, device, precision.frozen)  # --dtype auto: frozen weights in bf16 on CUDA
    B = spec["batch"]
    ref_table = compute_reference_logps(model, [ex for batch in batches for ex in batch], batching, B, precision.autocast)
    source = None if spec["model"].startswith("random:") else Path(spec["model"])
    optimizer, trainable, _ = begin_stage(model, ("attn",), lora=False, lr=flags.lr, weight_decay=flags.weight_decay, compile=compiled,
                                          checkpoint_activations=flags.checkpoint_activations, source=source)
    conn.send({"ready": True, "setup_s": time.perf_counter() - t0, "amp": precision.autocast is not None, "compile": compiled,
               "packing": batching.packing, "attention": batching.attention if batching.packing else None})

    def step(k: int) -> None:
        j = k % len(batches)
        lr = lr_at(k, 10**6, flags.lr, flags.warmup)
        optimizer_step(model, optimizer, trainable, [(batches[j], ref_table[j * B : (j + 1) * B])], lr, objective, batching,
                       precision, flags.grad_clip)

    serve(conn, device, step)


def serve(conn, device: torch.device, step) -> None:
    """Answer the parent: ("run", n) with the times of the next n calls `step(k)`, ("stop",) with the peak memory."""
    k, measured = 0, None
    while (command := conn.recv())[0] == "run":
        measured = measured or start_peak(device)
        times = []
        for _ in range(command[1]):
            sync(device)
            t = time.perf_counter()
            step(k)
            sync(device)
            times.append(time.perf_counter() - t)
            k += 1
        conn.send({"step_s": times})
    conn.send(final_memory(device, measured))


# --- the parent: start the workers, alternate them, tabulate -----------------------------------


class Side:
    """One worker process, its step counter and its timings."""

    def __init__(self, name: str, spec: dict):
        ctx = mp.get_context("spawn")  # a fresh interpreter: its memory is its own
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(name, child, spec), daemon=True)
        self.process.start()
        child.close()
        self.info, self.times, self.batches, self.step, self.error = {}, [], [], 0, None

    def ask(self, *command) -> dict | None:
        """Send a command (none: just read the next message); None once the worker has failed."""
        if self.error:
            return None
        try:
            if command:
                self.conn.send(command)
            reply = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            reply = {"error": f"worker died (exit code {self.process.exitcode})"}
        if "error" in reply:
            self.error = reply["error"]
            print(f"{self.name}: {reply['error']}\n{reply.get('trace', '')}", file=sys.stderr)
            return None
        return reply

    def ready(self) -> None:
        self.info.update(self.ask() or {})

    def run(self, steps: int, n_batches: int, keep: bool) -> None:
        """`steps` steps; both sides take batch (step mod n_batches), so step k is the same work on both."""
        if steps == 0:
            return
        reply = self.ask("run", steps)
        if reply and keep:
            self.times += reply["step_s"]
            self.batches += [(self.step + i) % n_batches for i in range(steps)]
        self.step += steps

    def finish(self) -> None:
        self.info.update(self.ask("stop") or {})
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def run_sides(spec: dict, args, n_batches: int, alternate: bool) -> dict[str, Side]:
    """Every asked-for side on `spec`: warm-up, then `rounds` rounds of `steps` steps, alternating or one after the other."""
    order = [s for s in SIDES if s in args.sides]
    sides = {}
    if alternate:
        for name in order:  # set up side by side (untimed), then time them one at a time
            sides[name] = Side(name, spec)
        for name in order:
            sides[name].ready()
        for name in order:
            sides[name].run(args.warmup, n_batches, keep=False)
        for _ in range(args.rounds):
            for name in order:
                sides[name].run(args.steps, n_batches, keep=True)
        for name in order:
            sides[name].finish()
    else:
        for name in order:
            sides[name] = Side(name, spec)
            sides[name].ready()
            sides[name].run(args.warmup, n_batches, keep=False)
            for _ in range(args.rounds):
                sides[name].run(args.steps, n_batches, keep=True)
            sides[name].finish()
    return sides


def side_result(side: Side, batch: int, tokens: list[int], flops: list[float], matmul_flops: float) -> dict:
    """One side's cells of a row: examples/s over all its timed steps, medians over them, its memory, its setup."""
    r = {"error": side.error} if side.error else {}
    if side.times:
        r.update(examples_per_s=batch * len(side.times) / sum(side.times),
                 tokens_per_s=statistics.median(tokens[j] / t for j, t in zip(side.batches, side.times)),
                 mfu=statistics.median(flops[j] / t / matmul_flops for j, t in zip(side.batches, side.times)),
                 step_s=statistics.median(side.times), timed_steps=len(side.times), all_step_s=side.times)
    for key in ("peak_bytes", "peak_kind", "peak_covers", "baseline_bytes", "setup_s", "amp", "compile", "packing", "attention", "versions"):
        if key in side.info:
            r[key] = side.info[key]
    return r


def measure(spec: dict, args) -> dict:
    """Both sides on one (length, batch) setting: warm-up, then `rounds` rounds of `steps` steps each."""
    from clo.model.config import ModelConfig

    batches, _ = bench_batches(spec)
    cfg = ModelConfig.from_hf(model_config(spec))
    tokens = [count_tokens(batch) for batch in batches]
    flops = [step_flops(cfg, batch) for batch in batches]
    alternate = args.alternate == "on" or (args.alternate == "auto" and spec["device"] == "cpu")
    sides = run_sides(spec, args, len(batches), alternate)

    row = {"mix": spec["mix"], "length": spec["length"], "batch": spec["batch"], "alternated": alternate,
           "lengths": describe([ex for batch in batches for ex in batch]),
           "tokens_per_step": statistics.median(tokens),
           "padded_length": max(len(p) + len(r) for batch in batches for ex in batch for p, r in ex.sequences),
           "step_gflops": statistics.median(flops) / 1e9}
    for name, side in sides.items():
        row[name] = side_result(side, spec["batch"], tokens, flops, args.matmul_flops)
    if "trl" in sides and "collated_tokens" in sides["trl"].info:
        # TRL's collator counted the non-padding tokens of each batch it built: they must be clo's counts
        row["same_tokens"] = sides["trl"].info["collated_tokens"] == tokens
    return row


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict], sides: list[str]) -> str:
    """The markdown table: one row per (length, batch), every side, and each clo side against TRL."""
    versus = [s for s in sides if s != "trl"] if "trl" in sides else []
    head = "| seq len | batch | tokens/step | " + " | ".join(f"{s} ex/s | {s} tok/s | {s} peak GiB | {s} MFU" for s in sides)
    head += "".join(f" | {s}/trl ex/s | {s}/trl memory" for s in versus) + (" | same tokens" if versus else "")
    lines = [head + " |", "|" + "---|" * head.count("|")]
    for row in rows:
        cells = [str(row["length"]), str(row["batch"]), "-" if row.get("tokens_per_step") is None else f"{row['tokens_per_step']:.0f}"]
        for s in sides:
            r = row.get(s, {})
            if "tokens_per_s" in r:
                cells += [f"{r['examples_per_s']:.3f}", f"{r['tokens_per_s']:.0f}", gib(r.get("peak_bytes")),
                          f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"]
            else:
                cells += [r.get("error", "-"), "-", gib(r.get("peak_bytes")), "-"]
        b = row.get("trl", {})
        for s in versus:
            a = row.get(s, {})
            cells += [f"{a['examples_per_s'] / b['examples_per_s']:.2f}x" if "examples_per_s" in a and "examples_per_s" in b else "-",
                      f"{a['peak_bytes'] / b['peak_bytes']:.2f}x" if a.get("peak_bytes") and b.get("peak_bytes") else "-"]
        if versus:
            cells.append({True: "yes", False: "NO"}.get(row.get("same_tokens"), "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", help="HF folder, the default model's name, or random:<shape> (shapes: "
                   f"{', '.join(RANDOM_SHAPES)}); default: smollm2-135m-instruct on CPU, random:llama2-7b on CUDA")
    p.add_argument("--tokenizer", help="folder whose tokenizer encodes the demo data (default: the model's, else the default model's)")
    p.add_argument("--mix", choices=MIXES, default="stretched", help="the work (bench/workload.py): demo examples stretched to "
                   "each length, or Alpaca's spread of lengths capped at each length")
    p.add_argument("--lang", default="sw", help="demo set whose examples are stretched to each length")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (with --mix alpaca: length caps) at the first batch size "
                   "(default CPU: 128 256 512, alpaca 512; CUDA: 1024, alpaca 2048)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="examples per step (x4 sequences); the first is used for the length "
                   "sweep, the others at the middle length (default CPU: 1 2 4; CUDA: 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side, alternating on CPU")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round; also the number of distinct batches")
    p.add_argument("--sides", nargs="+", default=["clo", "trl"], choices=SIDES, help="which implementations to run "
                   "(clo-padded: clo with --packing off)")
    p.add_argument("--alternate", choices=["auto", "on", "off"], default="auto", help="alternate the sides round by round, "
                   "both workers alive (auto: on for CPU; off for CUDA, where two 7B setups do not fit one card)")
    p.add_argument("--clo-flags", default="", help="extra train.py flags for the clo side, e.g. '--checkpoint-activations' or '--compile on'")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL with its default gradient checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--json", help="where the results go (default runs/bench/train-<device>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.warmup < 0 or args.rounds < 1 or args.steps < 1:
        raise CloError("--warmup must be >= 0, --rounds and --steps >= 1")
    clo_flags = parse_clo_flags(args.clo_flags)  # refused here, before any work, if one is not supported
    device = bench_device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or ("random:llama2-7b" if cuda else "smollm2-135m-instruct")
    alpaca = args.mix == "alpaca"
    args.lengths = args.lengths or ([2048 if alpaca else 1024] if cuda else [512] if alpaca else [128, 256, 512])
    args.batch_sizes = args.batch_sizes or ([1] if cuda else [1, 2, 4])
    model, tokenizer = resolve_models(args.model, args.tokenizer)
    info = measure_machine(device, args)

    rows = []
    vocab = model_config({"model": model})["vocab_size"]  # random shapes: token ids are taken modulo this
    for length, batch in sweep(args.lengths, args.batch_sizes):
        spec = {"device": args.device, "model": model, "tokenizer": tokenizer, "mix": args.mix, "lang": args.lang, "length": length,
                "batch": batch, "n_batches": args.steps, "vocab_size": vocab, "threads": args.threads,
                "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "clo": clo_flags}
        t = time.perf_counter()
        rows.append(measure(spec, args))
        print(f"seq {length} batch {batch}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        print(table(rows[-1:], args.sides).splitlines()[-1], file=sys.stderr)
    report(rows, args, model, info, device)
    return rows


def sweep(lengths: list[int], batch_sizes: list[int]) -> list[tuple[int, int]]:
    """(length, batch) settings: every length at the first batch size, the other batch sizes at the middle length."""
    middle = sorted(lengths)[len(lengths) // 2]
    settings = [(length, batch_sizes[0]) for length in lengths]
    return settings + [(middle, b) for b in batch_sizes[1:] if (middle, b) not in settings]


def measure_machine(device: torch.device, args) -> dict:
    """The machine's facts and its matmul rate in the step's compute dtype (also set as args.matmul_flops)."""
    # The peak the MFU is measured against: the compute dtype of the step (bf16 under autocast).
    compute_dtype = torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    args.matmul_flops = matmul_rate(device, compute_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    os.environ["TQDM_DISABLE"] = "1"  # the workers inherit it: no progress bars between the table rows
    info = {**machine(), "matmul_tflops": args.matmul_flops / 1e12, "matmul_dtype": str(compute_dtype).removeprefix("torch.")}
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info.get('gpu', 'no GPU')}; torch {torch.__version__}; "
          f"measured {info['matmul_dtype']} matmul {info['matmul_tflops']:.2f} TFLOP/s", file=sys.stderr)
    return info


def report(rows: list[dict], args, model: str, info: dict, device: torch.device) -> None:
    """The title, the table and the notes on stdout; everything in the JSON file."""
    sides = [s for s in SIDES if s in args.sides]
    versions = next((r["trl"]["versions"] for r in rows if "versions" in r.get("trl", {})), {})
    title = (f"{model_name(model)}, {args.device}, {args.mix} work, "
             f"warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps per side"
             f"{', clo flags ' + repr(args.clo_flags) if args.clo_flags else ''}"
             f"{', alternating' if rows and rows[0]['alternated'] else ''}; torch {torch.__version__}"
             + "".join(f", {k} {v}" for k, v in versions.items()))
    peak = next((r[s]["peak_kind"] + " over " + str(r[s].get("peak_covers")) for r in rows for s in sides if "peak_kind" in r.get(s, {})), "")
    print(f"\n{title}\nmachine: {info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if 'gpu' in info else ''}; "
          f"MFU against the measured {info['matmul_dtype']} matmul rate {info['matmul_tflops']:.2f} TFLOP/s; peak: {peak}\n")
    print(table(rows, sides))
    for row in rows:
        print(f"\nwork of seq {row['length']} batch {row['batch']} (tokens: median / p90 / max): "
              + ", ".join(f"{k} {v['median']:g}/{v['p90']}/{v['max']}" for k, v in row["lengths"].items()))
    if "trl" in sides:
        print("\nDifferences that remain between the two sides:")
        for note in NOTES:
            print(f"- {note}")
    write_results(args.json, f"train-{device.type}", {"title": title, "machine": info, "settings": vars(args) | {"model": model},
                                                       "rows": rows, "notes": NOTES if "trl" in sides else []})


if __name__ == "__main__":
    run_cli(main)
