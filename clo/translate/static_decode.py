"""Beam search's decoding step in static shapes, so that it compiles: on CUDA, one CUDA graph per step.

Eagerly, a decoding step launches ~25 kernels per decoder layer and the GPU waits for Python: on an
H200, M2M100-1.2B's step over 32 sentences x 5 beams took ~11 ms for ~0.35 ms of matmul work
(BENCHMARKS.md, 2026-12-04). Here every tensor the step touches keeps its shape from the first step
to the last:

- the decoder's self-attention keys/values live in one buffer per layer, [N, H, max_len, hd], written
  in place at the step's slot; each query attends through a mask of the slots written so far;
- the beam reordering chosen after a step (`select_rows`) is applied at the start of the next one,
  inside the same graph;
- cross-attention keys/values are padded to a multiple of SOURCE_BUCKET positions (masked), so that
  batches of sources of different lengths share a graph;
- sentences that are done keep their rows (decoded, never read), since every drop would be a new shape.

The reordering copies the whole cache twice each step (gathered, then copied back): at max_length 200 with 160 rows
of M2M100-1.2B in bf16 the cache is ~3 GB, so ~12 GB of memory traffic (~3 ms on an H200; at the benchmark's
max_length 64, ~1 ms), the price of one graph for every step of a batch.

Buffers stay allocated on the model between batches of one shape (`StaticCache.for_model`): a CUDA
graph replays on the addresses it was recorded with. Masked slots add exact zeros to the attention
sums, so the scores are those of the growing cache up to float rounding (tests/test_m2m100.py: the
same outputs as transformers' generate).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from clo.translate.m2m100 import M2M100, DecoderCache

SOURCE_BUCKET = 32  # cross-attention lengths are multiples of this: a few graphs, not one per batch


def static_zeros(*shape, dtype, device) -> Tensor:
    """A zero buffer that a CUDA graph may update in place (its address is part of the graph)."""
    buffer = torch.zeros(*shape, dtype=dtype, device=device)
    torch._dynamo.mark_static_address(buffer)
    return buffer


class StaticCache:
    """The decoding state of one batch in fixed shapes. N decoder rows = sources * group (beams).

    self_k/self_v: per layer [N, H, max_len, hd]; cross_k/cross_v: per layer [sources, H, S', hd],
    S' the source length rounded up to SOURCE_BUCKET; cross_mask [sources, 1, 1, S'] bool;
    rows [N]: the reordering the next step applies first; slot: the next decoder position."""

    def __init__(self, self_k, self_v, cross_k, cross_v, cross_mask, group: int):
        self.self_k, self.self_v, self.cross_k, self.cross_v = self_k, self_v, cross_k, cross_v
        self.cross_mask, self.group = cross_mask, group
        n, device = self_k[0].size(0), self_k[0].device
        self.rows = torch.arange(n, device=device)
        self.slot = 0

    @classmethod
    def for_model(cls, model: M2M100, start: DecoderCache, max_len: int) -> "StaticCache":
        """The buffers of `start`'s shapes (allocated once per shape on `model`, zeroed here), holding
        start's cross-attention keys/values."""
        sources, H, S, hd = start.cross_k[0].shape
        width = -(-S // SOURCE_BUCKET) * SOURCE_BUCKET
        n, dtype, device = sources * start.group, start.cross_k[0].dtype, start.cross_k[0].device
        pool = model.__dict__.setdefault("_static_decode_buffers", {})
        layers = len(start.cross_k)
        self_key, cross_key = ("self", n, max_len, dtype, device), ("cross", sources, width, dtype, device)
        if self_key not in pool:
            pool[self_key] = [[static_zeros(n, H, max_len, hd, dtype=dtype, device=device) for _ in range(layers)] for _ in "kv"]
        if cross_key not in pool:
            pool[cross_key] = ([static_zeros(sources, H, width, hd, dtype=dtype, device=device) for _ in range(2 * layers)],
                               static_zeros(sources, 1, 1, width, dtype=torch.bool, device=device))
        self_k, self_v = pool[self_key]
        cross, cross_mask = pool[cross_key]
        for buffer in self_k + self_v:
            buffer.zero_()  # stale keys from another batch are masked, but zeros can never be NaN
        for buffer, value in zip(cross, start.cross_k + start.cross_v):
            buffer[:, :, :S].copy_(value)
            buffer[:, :, S:].zero_()
        cross_mask[..., :S].copy_(start.cross_mask)
        cross_mask[..., S:] = False
        return cls(self_k, self_v, cross[:layers], cross[layers:], cross_mask, start.group)

    def select_rows(self, rows: Tensor) -> None:
        """Keep decoder rows `rows` (beam reordering): applied by the next step."""
        self.rows = rows


def decode_step(model: M2M100, tokens: Tensor, rows: Tensor, slot: Tensor, self_k: list[Tensor], self_v: list[Tensor],
                cross_k: list[Tensor], cross_v: list[Tensor], cross_mask: Tensor, group: int) -> Tensor:
    """One decoding step: reorder the rows' past by `rows` [N], then feed tokens [N, 1] at position
    `slot` (0-d) -> logits [N, V]. Writes each layer's new key/value into self_k/self_v in place."""
    max_len = self_k[0].size(2)
    visible = (torch.arange(max_len, device=tokens.device) <= slot)[None, None, None, :]  # [1, 1, 1, max_len]
    y = model.embed(tokens, past=slot)
    for layer, k_all, v_all, ck, cv in zip(model.decoder.layers, self_k, self_v, cross_k, cross_v):
        k_all.copy_(k_all.index_select(0, rows))
        v_all.copy_(v_all.index_select(0, rows))
        h = layer.self_attn_layer_norm(y)
        k, v = layer.self_attn.keys_values(h)  # [N, H, 1, hd]
        k_all.index_copy_(2, slot.view(1), k)
        v_all.index_copy_(2, slot.view(1), v)
        y = y + layer.self_attn.attend(h, k_all, v_all, mask=visible)
        y = layer.after_self_attention(y, ck, cv, cross_mask, group)
    return model.logits(model.decoder.layer_norm(y))[:, -1]


def compiled_step(model: M2M100):
    """decode_step compiled once per model, static shapes: one CUDA graph per shape on CUDA
    (torch.compile's "reduce-overhead"), inductor's kernels elsewhere."""
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        cuda = next(model.parameters()).device.type == "cuda"
        # one graph per (rows, max_len, source bucket): a run's batches of sorted lengths make several
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        step = torch.compile(decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)
        model.__dict__["_compiled_decode_step"] = step
    return step


def step_log_probs(step, model: M2M100, tokens: Tensor, cache: StaticCache) -> Tensor:
    """Run `step` (decode_step or its compiled form) on the cache's state -> log-probs [N, V] in fp32,
    a copy (a CUDA graph's output is overwritten by its next replay)."""
    slot = torch.tensor(cache.slot, device=tokens.device)
    logits = step(model, tokens, cache.rows, slot, cache.self_k, cache.self_v, cache.cross_k, cache.cross_v,
                  cache.cross_mask, cache.group)
    cache.slot += 1
    return F.log_softmax(logits.float(), dim=-1)
