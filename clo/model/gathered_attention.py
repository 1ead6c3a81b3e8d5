"""Variable-length attention from SDPA: each sequence's tokens gathered out of the packed rows.

A packed row holds several segments side by side (clo/train/packing.py). SDPA over the whole row
with a dense boolean mask computes every query-key pair of the row, L x L, and masks most of them:
a row of many short segments is mostly such pairs, and the CPU's flash kernel skips key blocks only
under `is_causal`. Here attention runs per sequence instead, as varlen kernels do on GPUs:

    packed row    [ x | y_1 | y_2 ][ x' | y'_1 ] tail
    causal calls  [ x | y_1 ]  [ x' | y'_1 ]        is_causal, no mask: the prompt and first answer
    answer calls  queries y_2, keys [ x | y_2 ]      a later answer sees the prompt and itself

The projections, RoPE, MLP and head still run on the packed rows (each prompt once); only q, k, v
are gathered, by flat index into the rows, into calls of similar length (right-padded with a zero
token that no real query sees), and every output is put back where its query came from. A row's
tail gets zeros (it is never read). Same rule, same keys, in the same order as the dense mask: the
same numbers up to float rounding, and entries of one call never mix, so one sequence's tokens
cannot change another's result.

Precision: under CPU bf16 autocast the calls run in fp32, more precise and there faster, with AMX
or without: the CPU flash kernel's fwd+bwd per query token at 64-256 keys costs 10.2-14.2 us in bf16
against 5.4-12.7 in fp32 on a 2-core AMD EPYC with AVX512_BF16, and 27-46 us against 13-22 on a
2-core Intel Xeon with AMX (bench/bench_attention.py), and short calls are what this file makes. On
real packed batches (the Alpaca mix) the gathered calls beat the dense mask with fp32 calls (AMX:
1.55x) and lost to it with bf16 calls (AMX: 0.86x); BENCHMARKS.md. On CUDA the calls stay in
autocast's bf16.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Call:
    """One SDPA call of n sequences, Tq queries and S keys each; mask [n, 1, Tq, S] bool (or [1, 1, Tq, S],
    one window for all), or None for a causal call (its queries are its keys, Tq == S)."""

    n: int
    Tq: int
    S: int
    mask: torch.Tensor | None


@dataclass
class Gathered:
    """Every call of one packed batch as flat indices into the packed rows (index R*L is the zero token):
    queries [sum n * Tq] and keys [sum n * S], call after call; and back [R*L]: the row of the call
    outputs (concatenated in the same order, then one zero row) that each position of the rows takes."""

    calls: list[Call]
    queries: torch.Tensor
    keys: torch.Tensor
    back: torch.Tensor

    def to(self, device) -> "Gathered":
        calls = [Call(c.n, c.Tq, c.S, None if c.mask is None else c.mask.to(device)) for c in self.calls]
        return Gathered(calls, self.queries.to(device), self.keys.to(device), self.back.to(device))


def calls_dtype(q: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """fp32 under CPU autocast (see the module's docstring), else v's dtype (autocast's bf16 on CUDA: q and k
    leave RoPE in fp32 while v is bf16, and SDPA would cast them anyway)."""
    return torch.float32 if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") else v.dtype


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Gathered, gqa: bool) -> torch.Tensor:
    """softmax(q kᵀ / √hd) v per sequence: q [R, H, L, hd], k, v [R, KV, L, hd] -> [R, H, L, hd]."""
    R, H, L, hd = q.shape
    dtype = calls_dtype(q, v)
    leave_autocast = dtype == torch.float32 and torch.is_autocast_enabled(q.device.type)  # else it casts them back to bf16

    def gather(t, index, sizes):  # [R, h, L, hd] -> one [n * T, h, hd] per call: one gather (and one scatter back) per tensor
        t = t.to(dtype).transpose(1, 2).reshape(R * L, t.shape[1], hd)
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])]).index_select(0, index).split(sizes)

    qs = gather(q, plan.queries, [c.n * c.Tq for c in plan.calls])
    ks, vs = (gather(t, plan.keys, [c.n * c.S for c in plan.calls]) for t in (k, v))
    outs = []
    for c, qc, kc, vc in zip(plan.calls, qs, ks, vs):
        qc, kc, vc = qc.view(c.n, c.Tq, H, hd).transpose(1, 2), kc.view(c.n, c.S, -1, hd).transpose(1, 2), vc.view(c.n, c.S, -1, hd).transpose(1, 2)
        with torch.autocast(q.device.type, enabled=False) if leave_autocast else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None, enable_gqa=gqa)
        outs.append(y.transpose(1, 2).flatten(0, 1))  # [n * Tq, H, hd]
    outs.append(outs[0].new_zeros(1, H, hd))
    return torch.cat(outs).index_select(0, plan.back).view(R, L, H, hd).transpose(1, 2)
