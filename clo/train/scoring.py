"""Sequence log-probs through the decoder in length groups: less padding, the same numbers.

A batch of CLO's four sequences per example mixes lengths (English and target-language answers
differ, and so do prompts), and one [4B, T] tensor pads every row to the longest: on the demo set a
third of the default job's tokens were padding. Sorting the rows by length and running them as
`groups` tensors, each padded to its own longest, gives the same per-sequence log-probs (a row's
causal attention never sees another row) from fewer tokens. The loss is still computed once over
all rows, so the token-mean NLL and the gradient are those of the single padded batch; only the
order of floating-point sums inside the matmuls differs.

    rows sorted by length:  ▇▇▇▇▇▇▇▇▇▇▇▇▇
                            ▇▇▇▇▇▇▇▇▇▇▇▇·  group 2 (padded to its longest)
                            ▇▇▇▇▇▇▇▇·····
                            ▇▇▇▇▇▇▇······  group 1
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from clo.train.batching import EncodedExample, collate_sequences, flat_sequences, length_groups
from clo.train.loss import response_logps, token_logps_at
from clo.train.packing import Packed, pack
from clo.world import World


def sequence_logps(model, sequences, pad_id: int, bucket: int, groups: int = 1):
    """log π(response | prompt) of every (prompt ids, response ids) pair, in `groups` length groups.

    Returns (logp_sum [N] float32, n_tokens [N] long) in the order of `sequences`, with gradients
    to whatever in the model requires them (call under torch.no_grad() for a reference pass).
    """
    device = model.embed_tokens.weight.device
    parts, counts, rows = [], [], []
    for idx in length_groups([len(p) + len(r) for p, r in sequences], groups):
        tokens, labels = collate_sequences([sequences[i] for i in idx], pad_id, bucket)
        labels = labels.to(device)
        logps, n_tokens = model(tokens.to(device), head=lambda hidden, weight: response_logps(hidden.to(weight.dtype), weight, labels))
        parts.append(logps), counts.append(n_tokens), rows.extend(idx)
    back = torch.empty(len(rows), dtype=torch.long)
    back[torch.tensor(rows)] = torch.arange(len(rows))  # sorted position of each original row
    back = back.to(device)
    return torch.cat(parts)[back], torch.cat(counts)[back]


def packed_sequence_logps(model, sequences, pad_id: int, bucket: int, attention: str = "sdpa", one_row: bool | None = None,
                          few_shapes: bool = False):
    """`sequence_logps` from packed, prefix-shared rows (clo/train/packing.py): the same numbers up to
    float rounding, from each prompt computed once and no padding but the rows' ends.
    attention: "sdpa" (a dense boolean mask), "gathered" (SDPA per sequence) or "flex" (FlexAttention's
    block-sparse kernel). one_row (None: unless "sdpa", whose cost grows with a row's length squared)
    and few_shapes: `pack`'s layout."""
    device = model.embed_tokens.weight.device
    one_row = attention != "sdpa" if one_row is None else one_row
    packed = pack(sequences, pad_id, bucket, model.cfg.sliding_window, one_row, few_shapes).to(device)

    def head(hidden, weight):
        return token_logps_at(hidden.to(weight.dtype), weight, packed.read_rows, packed.read_cols, packed.targets)

    token_logps = model(packed.tokens, positions=packed.positions, mask=packed.attention(attention), head=head)
    logp_sum = token_logps.new_zeros(packed.n_sequences).index_add(0, packed.owners, token_logps)
    return logp_sum, torch.bincount(packed.owners, minlength=packed.n_sequences)


@dataclass(frozen=True)
class Batching:
    """How sequences become tensors: the pad id, lengths rounded up to a multiple of `bucket`, and
    `groups` length groups per batch (`sequence_logps`); or, with `packing`, packed prefix-shared
    rows (`packed_sequence_logps`), where groups play no part, attended by `attention`'s kernel."""

    pad_id: int
    bucket: int
    groups: int
    packing: bool = False
    attention: str = "sdpa"
    one_row: bool = False  # packed rows' layout: one row of every segment (`pack`)
    few_shapes: bool = False  # packed lengths rounded to 4 per doubling, for compiled blocks (`row_length`)

    @classmethod
    def resolve(cls, pad_id: int, bucket: int, groups: int, device: torch.device, compiled: bool, packing: str = "auto",
                attention: str = "auto") -> "Batching":
        """0 and "auto" mean auto. bucket: 64 when compiling (one graph per padded shape: keep the shapes
        few), else 8. groups: 4 on CPU, where a third of the demo's padded tokens were padding and 4
        groups cut a default-job step from 26.8 to 18.3 s (AMD EPYC, BENCHMARKS.md); 1 on CUDA, not
        yet measured there. packing: auto is on for CPUs, where the default job's steps took a median
        22.5 s packed vs 25.8 s padded in 4 groups (AMD EPYC, fp32, BENCHMARKS.md), and off on CUDA
        until FlexAttention's training there is tested equal to the dense mask's (tests/test_cuda.py), although
        packed rows were 1.75x the padded examples/s on an H200 (7B shape, Alpaca's lengths). attention (packed rows only): auto is FlexAttention on CUDA, where a
        dense mask keeps SDPA off its flash kernel, and "gathered" (SDPA per sequence) on CPUs, where it
        beat the dense mask's steps on the Alpaca mix 1.09x in fp32 and 1.13x in bf16 (AMD EPYC with
        AVX-512) and on the demo set 1.13x in bf16 (Intel Xeon with AMX; BENCHMARKS.md); bucket auto is 128 with FlexAttention (its block size: few shapes to compile).
        one_row: the per-sequence kernels (gathered, flex) take every segment in one row, no row tails: 1.07x
        (demo) and 1.10x (Alpaca) the gathered steps over rows as long as the longest segment (AMD EPYC with
        AVX-512, bf16); the dense mask keeps such rows. few_shapes when compiled: one Alpaca epoch's packed
        batches of 8 have 10 lengths instead of 42 shapes to build a graph for (`python bench/bench_shapes.py`)."""
        packed = packing == "on" or (packing == "auto" and device.type == "cpu")
        kernel = attention if attention != "auto" else "flex" if device.type == "cuda" else "gathered"
        if not packed:
            kernel = "sdpa"  # padded rows are causal: SDPA's own kernels
        default_bucket = 128 if kernel == "flex" else 64 if compiled else 8
        return cls(pad_id, bucket or default_bucket, groups or (1 if device.type == "cuda" else 4), packed, kernel,
                   one_row=kernel != "sdpa", few_shapes=compiled)

    def logps(self, model, sequences):
        """log π(response | prompt) of (prompt ids, response ids) pairs. -> (logp_sum [N], n_tokens [N])."""
        if self.packing:
            return packed_sequence_logps(model, sequences, self.pad_id, self.bucket, self.attention, self.one_row, self.few_shapes)
        return sequence_logps(model, sequences, self.pad_id, self.bucket, self.groups)

    def describe(self) -> str:
        """What of the batching changes the numbers (float rounding): part of the reference cache's key."""
        if not self.packing:
            return f"bucket {self.bucket}, groups {self.groups}"
        kernel = f", {self.attention}" if self.attention != "sdpa" else ""
        layout = (", one row" if self.one_row else "") + (", few shapes" if self.few_shapes else "")
        return f"bucket {self.bucket}, groups {self.groups}, packed{kernel}{layout}"

    def pack(self, sequences, window: int | None = None) -> Packed:
        """The packed rows `logps` runs (counted by the benchmarks)."""
        return pack(sequences, self.pad_id, self.bucket, window, self.one_row, self.few_shapes)


def four_way_rows(model, batch: list[EncodedExample], batching: Batching) -> torch.Tensor:
    """log π of each example's four sequences: [B, 4] float32 on the CPU, columns in the examples' order."""
    logps, _ = batching.logps(model, flat_sequences(batch))
    return logps.float().cpu().view(4, len(batch)).T


@torch.no_grad()
def example_logps(model, examples: list[EncodedExample], batching: Batching, batch_size: int, desc: str = "log-probs",
                  world: World = World()) -> torch.Tensor:
    """`four_way_rows` of every example, `batch_size` at a time, shortest first (less padding, and a
    bar that speeds up): [N, 4] float32, row i = example i. The one scorer of the reference table,
    held-out preference and the multiple-choice fallback; a row left unfilled stays NaN.

    N processes take the batches in turn (the same batches as one process, so the same numbers) and
    gather the table; one without a batch in the last round scores the last batch again, because
    every process must run the same forward passes.
    """
    out = torch.full((len(examples), 4), float("nan"))
    order = sorted(range(len(examples)), key=lambda i: examples[i].longest)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = {}
    for r in tqdm(range(-(-len(batches) // world.size)), desc=desc, unit="batch", disable=not world.main):
        b = r * world.size + world.rank
        rows = four_way_rows(model, [examples[i] for i in batches[min(b, len(batches) - 1)]], batching)
        if b < len(batches):
            mine[b] = rows
    for b, rows in world.merge(mine).items():
        out[batches[b]] = rows
    return out
