"""What attention costs on this machine: SDPA per query token by length and dtype, and packed rows'
attention through the dense mask vs gathered per sequence (clo/model/gathered_attention.py).

    python bench/bench_attention.py                  # CPU: both parts, the Alpaca mix of bench/workload.py

Part 1 (`kernel`): fwd+bwd of `F.scaled_dot_product_attention` on [n, 9, T, 64] queries and [n, 3, T, 64]
keys/values (SmolLM2's heads), n = 4096 // T so every shape holds ~4k query tokens, with a causal
boolean mask and with `is_causal`, in fp32 and bf16: microseconds per query token. On CPU the
flash kernel's cost per token is what decides whether cutting rows into short calls pays.
Part 2 (`packed`): the attention of real packed batches (the first --batches batches of 8 Alpaca
examples after the bench's shuffle), q/k/v random of the rows' shapes, fwd+bwd under the same autocast
as a training step (`--amp`): the dense mask (`--attention sdpa`) vs the gathered calls
(`--attention gathered`, whose calls run in fp32 under CPU autocast; under autocast both call
precisions are timed as well, `gathered_bf16_calls` and `gathered_fp32_calls`). Medians of --repeats calls
after one. Attention only: the step's matmuls are `bench_packing.py`'s business.
"""

import argparse
import contextlib
import random
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from common import machine, write_results  # puts clo on sys.path
from workload import alpaca_examples

from clo.model import gathered_attention
from clo.model.chat import detect_format
from clo.model.decoder import attend
from clo.model.sources import DEFAULT_MODEL, resolve_model
from clo.model.tokenizer import load_tokenizer
from clo.runtime import bf16_is_fast
from clo.train.batching import flat_sequences
from clo.train.packing import pack


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def kernel_costs(lengths, repeats: int) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for T in lengths:
            n = max(1, 4096 // T)
            q, k, v = (torch.randn(n, h, T, 64, dtype=dtype, requires_grad=True) for h in (9, 3, 3))
            mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(n, 1, T, T).contiguous()
            row = {"dtype": str(dtype).removeprefix("torch."), "T": T, "n": n}
            for name, kw in (("mask", {"attn_mask": mask}), ("causal", {"is_causal": True})):
                ms = median_ms(lambda kw=kw: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw).sum().backward(), repeats)
                row[f"{name}_us_per_token"] = 1e3 * ms / (n * T)
            rows.append(row)
            print(f"{row['dtype']:>8} T {T:>4} (n {n:>3}): mask {row['mask_us_per_token']:.1f} us/token, causal {row['causal_us_per_token']:.1f}", flush=True)
    return rows


def packed_costs(batches: int, amp: bool, repeats: int) -> list[dict]:
    folder = resolve_model(DEFAULT_MODEL)
    tok = load_tokenizer(folder)
    examples = alpaca_examples(tok, detect_format(tok, "auto"), 512)
    random.Random(0).shuffle(examples)  # bench_packing.py's order
    rows = []
    for b in range(batches):
        p = pack(flat_sequences(examples[8 * b : 8 * b + 8]), tok.pad_id, 8)
        R, L = p.tokens.shape
        q, k, v = (torch.randn(R, h, L, 64, requires_grad=True) for h in (9, 3, 3))
        plan = p.gathered()
        # under autocast, time the gathered calls in both precisions beside gathered_attention.calls_dtype's choice
        forms = {"dense": (p.mask, None), "gathered": (plan, None)}
        if amp:
            forms |= {"gathered_bf16_calls": (plan, torch.bfloat16), "gathered_fp32_calls": (plan, torch.float32)}

        def step(form, calls_dtype):
            with mock.patch.object(gathered_attention, "calls_dtype", lambda q, v: calls_dtype) if calls_dtype else contextlib.nullcontext():
                with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                    y = attend(q, k, v, form, gqa=True)
                y.float().sum().backward()

        row = {"rows": R, "L": L, **{name: median_ms(lambda f=f: step(*f), repeats) for name, f in forms.items()}}
        rows.append(row)
        calls = f", calls bf16 {row['gathered_bf16_calls']:.1f} / fp32 {row['gathered_fp32_calls']:.1f} ms" if amp else ""
        print(f"batch {b}: rows {R} x {L}: dense {row['dense']:.1f} ms, gathered {row['gathered']:.1f} ms ({row['dense'] / row['gathered']:.2f}x){calls}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["both", "kernel", "packed"], default="both")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast in part 2 (auto: where bf16 is fast)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="where the results go (default runs/bench/attention-cpu.json)")
    args = p.parse_args()
    amp = args.amp == "on" or (args.amp == "auto" and bf16_is_fast("cpu"))
    out = {"machine": machine(), "settings": vars(args), "amp": amp}
    if args.part in ("both", "kernel"):
        out["kernel"] = kernel_costs(args.lengths, args.repeats)
    if args.part in ("both", "packed"):
        out["packed"] = packed_costs(args.batches, amp, args.repeats)
        total = {name: sum(r[name] for r in out["packed"]) for name in out["packed"][0] if name not in ("rows", "L")}
        print(f"all batches ({'bf16' if amp else 'fp32'} autocast): " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in total.items())
              + f": dense / gathered {total['dense'] / total['gathered']:.2f}x")
        out["packed_total_ms"] = total
    write_results(args.json, "attention-cpu", out)


if __name__ == "__main__":
    main()
