"""What loading the starting model costs each of N processes: whole-then-shard vs sharded as it loads.

    python bench/bench_sharded_load.py                                # default model, 2 CPU processes (gloo)
    python bench/bench_sharded_load.py --device cuda --processes 4 --model /path/to/Llama-2-13b-hf

`whole`: what train.py did before 2026-12-02: every process loads the whole model in fp32
(`load_model`), then `shard` cuts it. `sharded`: what it does now (`load_sharded`): the model is
sharded on the meta device and each process reads the checkpoint one tensor at a time, keeping its
rows. Each way runs in its own torchrun launch. Reported per process: load seconds, the peak of its
own memory above what it held before loading (`PeakMemory`), and the bytes of its fp32 shards, the
floor of any way.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import bench_device, machine, resolve_models, write_results  # puts clo on sys.path

from clo.world import start


def worker(args) -> None:
    from clo.model.hf_folder import load_model
    from clo.model.sources import resolve_model
    from clo.train.distributed import load_sharded, shard

    device = bench_device(args.device)
    world = start(device)
    device = world.device(device)
    folder = resolve_model(args.model)
    with PeakMemory(device) as peak:
        t0 = time.perf_counter()
        if args.way == "whole":
            model = load_model(folder, device, torch.float32)
            shard(model, world, None)
        else:
            model = load_sharded(folder, world, device, None)
        world.barrier()
        seconds = time.perf_counter() - t0
    shards = sum(p.to_local().numel() * 4 for p in model.parameters())
    row = {"way": args.way, "rank": world.rank, "load_s": seconds, "peak_above_start": peak.above_start, "shard_bytes": shards}
    (Path(args.results) / f"{args.way}-{world.rank}.json").write_text(json.dumps(row))
    world.finish()


class PeakMemory:
    """The peak of this process's own memory above its start, while the block runs. CUDA: peak allocated.
    CPU: anonymous resident memory (RssAnon, sampled every 2 ms), not RSS: the checkpoint is read through
    mmap, and its file pages, shared by every process and dropped at will, count in RSS."""

    def __init__(self, device: torch.device):
        self.device, self.above_start = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start, self.peak, self.done = rss_anon(), rss_anon(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.above_start = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.done.set()
            self.thread.join()
            self.above_start = max(self.peak, rss_anon()) - self.start


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF folder or the default model's name")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", help="where the results go (default runs/bench/sharded-load-<device>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--way", choices=["whole", "sharded"], help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    args.model, _ = resolve_models(args.model, None)
    rows = []
    with tempfile.TemporaryDirectory() as results:
        for way in ("whole", "sharded"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes), str(Path(__file__).resolve()),
                   "--worker", "--way", way, "--device", args.device, "--model", args.model, "--results", results]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                sys.exit(f"{way}: torchrun failed:\n{done.stderr[-2000:]}")
            rows += [json.loads((Path(results) / f"{way}-{r}.json").read_text()) for r in range(args.processes)]
    print("| way | process | load s | peak above start (MiB) | its fp32 shards (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['rank']} | {r['load_s']:.2f} | {r['peak_above_start'] / 2**20:.0f} | {r['shard_bytes'] / 2**20:.0f} |")
    write_results(args.json, f"sharded-load-{args.device}", {"machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
