"""The cost of the distributed path: train.py's step as one process, under torchrun with 1 process
(FSDP2 at world size 1: what sharding alone costs) and with N processes, on the same global batches.

    python bench/bench_distributed.py                         # default model, CPU, 1 vs torchrun 1 vs torchrun 2
    python bench/bench_distributed.py --steps 6 --processes 2 4 --device cuda

Each configuration is one `train.py` run (--max-steps, no checkpoints, the reference table cached
by the first run); a step's time is its tokens / tokens_per_s from metrics.jsonl. Reported: the
median step time over the steps after the first (which also builds caches), and its ratio to the
one-process path. On CPU, each process gets cores // N threads (torchrun's default of 1 thread per
process would measure thread starvation, not the distributed path).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, write_results  # puts clo on sys.path


def run(label: str, launcher: list[str], threads: int, train_args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [*launcher, str(REPO / "train.py"), *train_args, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"error: {label} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in rows]
    return {"label": label, "threads_per_process": threads, "step_s": seconds, "median_step_s": statistics.median(seconds[1:] or seconds),
            "last_loss": rows[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration")
    p.add_argument("--processes", type=int, nargs="+", default=[2], help="process counts to run under torchrun besides 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-args", default="--lang sw", help="train.py flags (model, data, batch size, ...)")
    p.add_argument("--json", help="where the results go (default runs/bench/distributed-<device>.json)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    train_args = [*args.train_args.split(), "--device", args.device, "--max-steps", str(args.steps), "--save-every", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    with tempfile.TemporaryDirectory() as scratch:
        results = [run("python train.py", [sys.executable], cores, train_args, Path(scratch) / "plain")]
        for n in sorted({1, *args.processes}):
            threads = cores if args.device == "cuda" else max(1, cores // n)
            results.append(run(f"torchrun {n}", [*torchrun, "--nproc-per-node", str(n)], threads, train_args, Path(scratch) / f"torchrun{n}"))
    base = results[0]["median_step_s"]
    print(f"{'configuration':<18} {'median step s':>14} {'vs 1 process':>13} {'last loss':>12}")
    for r in results:
        r["ratio"] = r["median_step_s"] / base
        print(f"{r['label']:<18} {r['median_step_s']:>14.2f} {r['ratio']:>12.3f}x {r['last_loss']:>12.7f}")
    write_results(args.json, f"distributed-{args.device}", {"machine": machine(), "settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
