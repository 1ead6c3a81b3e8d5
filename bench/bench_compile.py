"""Time to the first training step: torch.compile of the whole `model.hidden` vs each block (train.py's choice).

    python bench/bench_compile.py             # SmolLM2-135M-Instruct, CPU, 4 sequences x 128 tokens
    python bench/bench_compile.py --device cuda

Each mode runs in a fresh process with empty inductor and Triton caches (a cold compile, as a
user's first run; warm on-disk caches cut both modes to seconds): the model with its attention
trainable, then 3 forward + backward steps under bf16 autocast. The first step includes compiling,
the later ones show the steady state.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import sync  # puts clo on sys.path

from clo.runtime import compile_blocks


def one_mode(mode: str, device: str, steps: int = 3) -> list[float]:
    """Seconds of each of `steps` forward + backward steps with `mode` compiled ("whole" or "blocks")."""
    from clo.model.hf_folder import load_model
    from clo.model.sources import DEFAULT_MODEL, resolve_model
    from clo.train.stages import set_trainable

    model = load_model(resolve_model(DEFAULT_MODEL), device)
    set_trainable(model, ("attn",))
    if mode == "whole":
        forward = torch.compile(model.hidden, dynamic=False)
    else:
        compile_blocks(model)  # what train.py compiles (clo.train.stages.begin_stage)
        forward = model.hidden
    tokens = torch.randint(0, 1000, (4, 128), device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            hidden = forward(tokens)
        hidden.float().pow(2).mean().backward()
        sync(torch.device(device))
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=["whole", "blocks"], help=argparse.SUPPRESS)  # the worker process
    args = p.parse_args(argv)
    if args.mode:
        print(" ".join(f"{t:.2f}" for t in one_mode(args.mode, args.device)))
        return
    print("| compiled | first step s (incl. compiling) | later steps s |\n|---|---|---|")
    for mode in ("whole", "blocks"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--device", args.device], capture_output=True, text=True,
                                 check=True, env=env)
        first, *later = out.stdout.split()
        print(f"| {'model.hidden whole' if mode == 'whole' else 'each block (train.py)'} | {first} | {', '.join(later)} |")


if __name__ == "__main__":
    main()
