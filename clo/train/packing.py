"""Packed, prefix-shared rows: every prompt computed once, no padding but the rows' ends.

CLO's four sequences per example are two prompts with two answers each: (x_en, y_en) and
(x_en, y_t) share x_en, (x_t, y_t) and (x_t, y_en) share x_t. Padded batches run each prompt twice
and pad every row to the longest. Here sequences that share a prompt become one *segment*,

    [ x | y_1 | y_2 ]      y_2 sees x and itself, never y_1; its RoPE positions continue from x's end,

so every answer is computed exactly as if it were its own sequence (same tokens in view, same
positions; with `--lora-dropout` > 0, default 0, the shared prompt draws one dropout mask for both its
answers where padded rows draw one each), and segments are packed side by side into rows of one length (first fit, longest
first): rows as long as the longest segment for the dense mask, whose cost grows with the square of a row's
length, and one row of them all for the kernels whose cost follows the segments, not the row ("gathered",
"flex"; `one_row`: no row tails, and few lengths for compiled blocks). Attention never crosses segments.
Per row, query i may see key j when

    segment[j] == segment[i]  and  j <= i  and  (part[j] == 0 (prompt) or part[j] == part[i])

A response token's log-prob is read from the hidden state just before it; for an answer's first
token that is the prompt's last position, which every answer of the segment reads. The tail of a
row (up to its length) is one segment of padding that attends to itself (some attention kernels
return NaN for a query with no visible key; torch 2.13's CPU SDPA returns zeros) and is never read;
the "gathered" form gives it zeros.

The rule reaches attention in one of three forms (`attention`):
- "sdpa": a dense boolean mask [R, 1, L, L]; SDPA computes every query-key pair of a row and masks
  most of them. The plainest statement of the rule: the oracle the other two are tested against.
- "gathered": SDPA per sequence, q, k, v gathered out of the rows (clo/model/gathered_attention.py):
  one causal call per segment's [prompt | first answer], one masked call per later answer, a few
  length groups of each. No pair outside a segment is computed (CPU's default: measured faster).
- "flex": a FlexAttention BlockMask of the same rule, whose fused kernel skips every 128 x 128 block
  that no query of it may see (CUDA: a dense mask would keep SDPA off its flash kernel).

Sequences are grouped by the prompt's exact token ids, so any two sequences with the same prompt
share it (in CLO, an example's two), and SFT's one sequence per example is a segment of one answer:
no prompt sharing, but no padding either.
"""

from dataclasses import dataclass

import torch

from clo.model.gathered_attention import Call, Gathered
from clo.train.batching import length_groups, round_up


@dataclass
class Segment:
    prompt: list[int]
    answers: list[tuple[int, list[int]]]  # (index of the sequence in the input, its response ids)

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(a) for _, a in self.answers)


@dataclass
class Packed:
    """Rows of packed segments and where to read each response token's log-prob.

    tokens, positions [R, L] long; seg_id, part [R, L] long: each token's segment (-1: the row's tail)
    and part (0: the prompt, k: answer k), from which `mask` and `block_mask` state the rule;
    read_rows, read_cols, targets, owners [M] long: response token m (of sequence owners[m]) is
    targets[m], predicted from the hidden state at (read_rows[m], read_cols[m]); spans: per segment
    (row, first column, prompt length, answer lengths), from which `gathered` builds its calls.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    seg_id: torch.Tensor
    part: torch.Tensor
    read_rows: torch.Tensor
    read_cols: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    n_sequences: int
    spans: list[tuple[int, int, int, tuple[int, ...]]]
    window: int | None = None

    def to(self, device) -> "Packed":
        moved = (t.to(device) for t in (self.tokens, self.positions, self.seg_id, self.part, self.read_rows, self.read_cols, self.targets, self.owners))
        return Packed(*moved, self.n_sequences, self.spans, self.window)

    @property
    def mask(self) -> torch.Tensor:
        """[R, 1, L, L] bool, True where query i may see key j: SDPA's form of the rule."""
        return segment_mask(self.seg_id, self.part, self.positions, self.window)

    def block_mask(self):
        """The same rule as a FlexAttention BlockMask (one per batch, shared by every layer)."""
        from torch.nn.attention.flex_attention import create_block_mask

        seg, part, pos, window = self.seg_id, self.part, self.positions, self.window

        def visible(b, h, q, k):
            ok = (seg[b, q] == seg[b, k]) & (k <= q) & ((part[b, k] == 0) | (part[b, k] == part[b, q]))
            return ok & (pos[b, q] - pos[b, k] < window) if window is not None else ok

        R, L = seg.shape
        return create_block_mask(visible, R, None, L, L, device=seg.device)

    def gathered(self, groups: int = 4) -> Gathered:
        """The same rule as `attend_gathered`'s calls: per segment, [prompt | first answer] as one causal
        sequence and (later answer | prompt + that answer) as queries | keys, each kind cut into `groups`
        length groups (more: less padding, more calls; 4 and 8 timed alike), lengths rounded up to 8."""
        R, L = self.tokens.shape
        zero = R * L  # the index of the zero token that padding gathers
        firsts, laters = [], []  # flat indices: [x | y_1]; (y_k, [x | y_k], len(x))
        for row, col, p, lengths in self.spans:
            prompt = list(range(row * L + col, row * L + col + p))
            start = prompt[-1] + 1
            for k, n in enumerate(lengths):
                answer = list(range(start, start + n))
                if k == 0:
                    firsts.append(prompt + answer)
                else:
                    laters.append((answer, prompt + answer, p))
                start += n

        def padded(lists, width):
            return torch.tensor([x + [zero] * (width - len(x)) for x in lists], dtype=torch.long)

        calls, queries, keys = [], [], []
        for idx in length_groups([len(f) for f in firsts], groups):
            T = round_up(max(len(firsts[i]) for i in idx), 8)
            index = padded([firsts[i] for i in idx], T)
            mask = None
            if self.window is not None:  # positions in [x | y_1] are the RoPE positions
                t = torch.arange(T)
                mask = ((t[None] <= t[:, None]) & (t[:, None] - t[None] < self.window))[None, None]
            calls.append(Call(len(idx), T, T, mask))
            queries.append(index.flatten())
            keys.append(index.flatten())
        for idx in length_groups([len(keys_of) for _, keys_of, _ in laters], groups):
            Tq, S = (round_up(max(len(laters[i][j]) for i in idx), 8) for j in (0, 1))
            q, k = padded([laters[i][0] for i in idx], Tq), padded([laters[i][1] for i in idx], S)
            at = torch.tensor([laters[i][2] for i in idx])[:, None, None] + torch.arange(Tq)[:, None]  # [n, Tq, 1]: each query's key index
            key = torch.arange(S)
            mask = key <= at
            if self.window is not None:
                mask &= at - key < self.window
            real = (q != zero)[:, :, None]
            mask = torch.where(real, mask, key == 0)  # a padding query sees one key: no NaN in the backward pass
            calls.append(Call(len(idx), Tq, S, mask[:, None]))
            queries.append(q.flatten())
            keys.append(k.flatten())
        queries, keys = torch.cat(queries), torch.cat(keys)
        back = torch.full((zero,), len(queries), dtype=torch.long)  # the tail: the zero row after every output
        real = queries != zero
        back[queries[real]] = torch.arange(len(queries))[real]
        return Gathered(calls, queries, keys, back)

    def attention(self, kind: str):
        """The rule in the form the attention kernel `kind` takes: "sdpa" (a dense mask), "gathered"
        (`attend_gathered`'s calls) or "flex" (a BlockMask)."""
        if kind == "flex":
            return self.block_mask()
        return self.gathered().to(self.tokens.device) if kind == "gathered" else self.mask


def segments(sequences: list[tuple[list[int], list[int]]]) -> list[Segment]:
    """Sequences grouped by identical prompt, in order of first appearance."""
    by_prompt: dict[tuple[int, ...], Segment] = {}
    for i, (prompt, response) in enumerate(sequences):
        by_prompt.setdefault(tuple(prompt), Segment(list(prompt), [])).answers.append((i, list(response)))
    return list(by_prompt.values())


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of at most `capacity`: longest first, each into the first bin it fits."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


# One row's most tokens. FlexAttention's `create_block_mask` evaluates the rule on every [L, L] pair at once
# (+2.3 GiB at L = 15,488, a one-off measurement on CPU, BENCHMARKS.md): a batch with more tokens gets several rows.
ROW_TOKENS = 16384


def row_length(tokens: int, bucket: int, few_shapes: bool = False) -> int:
    """`tokens` rounded up to a multiple of `bucket`; with `few_shapes`, further to one of 4 lengths per
    doubling (a multiple of 2^(k-2) for 2^k <= n < 2^(k+1): under 1/4 more tokens), since compiled blocks
    build a graph per shape: one Alpaca epoch's batches of 8 have 10 such lengths in one row, against 42
    [rows, length] shapes of rows as long as the longest segment (`python bench/bench_shapes.py`)."""
    n = round_up(tokens, bucket)
    return round_up(n, 2 ** max(0, n.bit_length() - 3)) if few_shapes else n


def pack(sequences: list[tuple[list[int], list[int]]], pad_id: int, bucket: int = 8, window: int | None = None,
         one_row: bool = False, few_shapes: bool = False) -> Packed:
    """(prompt ids, response ids) pairs -> Packed rows: of length L = the longest segment rounded up to
    `bucket` (so a row never holds more attention than its longest segment needs: the dense mask), or with
    `one_row`, one row of every segment, its total rounded up (`row_length`; past ROW_TOKENS, the fewest
    rows of near-equal length that first fit fills).
    window: a sliding-window model's window (Mistral), applied within each segment by position."""
    segs = segments(sequences)
    lengths = [len(s) for s in segs]
    L = row_length(max(lengths), bucket, few_shapes)
    if one_row:
        total = sum(lengths)
        n_rows = -(-total // ROW_TOKENS)
        L = max(L, row_length(-(-total // n_rows), bucket, few_shapes))
    rows = first_fit(lengths, L)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), L), dtype=torch.long)
    seg_id = torch.full((len(rows), L), -1, dtype=torch.long)  # the tail: segment -1
    part = torch.zeros((len(rows), L), dtype=torch.long)
    reads, spans = [], []  # (row, col, target, owner); (row, col, prompt length, answer lengths)
    for r, members in enumerate(rows):
        col = 0
        for s in members:
            seg, p = segs[s], len(segs[s].prompt)
            spans.append((r, col, p, tuple(len(a) for _, a in seg.answers)))
            tokens[r, col : col + p] = torch.tensor(seg.prompt)
            positions[r, col : col + p] = torch.arange(p)
            seg_id[r, col : col + p] = s
            start = col + p
            for k, (owner, answer) in enumerate(seg.answers, start=1):
                n = len(answer)
                tokens[r, start : start + n] = torch.tensor(answer)
                positions[r, start : start + n] = torch.arange(p, p + n)
                seg_id[r, start : start + n], part[r, start : start + n] = s, k
                before = [col + p - 1] + list(range(start, start + n - 1))  # the hidden state before each answer token
                reads += [(r, c, t, owner) for c, t in zip(before, answer)]
                start += n
            col = start
        positions[r, col:] = torch.arange(L - col)
    read_rows, read_cols, targets, owners = (torch.tensor(x, dtype=torch.long) for x in zip(*reads))
    return Packed(tokens, positions, seg_id, part, read_rows, read_cols, targets, owners, len(sequences), spans, window)


def segment_mask(seg_id: torch.Tensor, part: torch.Tensor, positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[R, 1, L, L] bool from per-token segment ids, parts (0 prompt, k answer k) and positions (module docstring)."""
    L = seg_id.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg_id.device).tril()  # on the rows' device: CUDA, for SDPA
    same = seg_id[:, :, None] == seg_id[:, None, :]
    visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
    allowed = same & causal & visible
    if window is not None:
        allowed &= (positions[:, :, None] - positions[:, None, :]) < window
    return allowed[:, None]
