"""From examples to tensors: every example becomes four sequences that share one forward pass.

    index  prompt  response   role in the loss (docs/paper.md "Loss")
    0      x_en    y_en       chosen   for x_en
    1      x_en    y_t        rejected for x_en
    2      x_t     y_t        chosen   for x_t, and the NLL target
    3      x_t     y_en       rejected for x_t

A batch of B examples is one [4B, T] tensor ordered [all 0s | all 1s | all 2s | all 3s], so both
versions of an example sit in the same batch as the paper requires, and `view(4, B)` splits them.
Sequences are right-padded to a multiple of `bucket` tokens, so torch.compile sees few shapes.

Truncation policy: an example whose longest sequence exceeds `max_length` is dropped and counted,
never cut (a cut response would lose its end-of-turn token and teach the model not to stop).
"""

from dataclasses import dataclass

import torch

from clo.model.chat import ChatFormat, encode_prompt, encode_response
from clo.model.tokenizer import Tokenizer
from clo.pairs import Example
from clo.train.loss import IGNORE_INDEX

SEQUENCE_NAMES = ("en_en", "en_t", "t_t", "t_en")


@dataclass
class EncodedExample:
    id: str
    sequences: list[tuple[list[int], list[int]]]  # 4 x (prompt ids, response ids), in SEQUENCE_NAMES order

    @property
    def longest(self) -> int:
        return max(len(p) + len(r) for p, r in self.sequences)


def encode_example(tok: Tokenizer, fmt: ChatFormat, ex: Example) -> EncodedExample:
    x_en, x_t = encode_prompt(tok, fmt, ex.prompt_en), encode_prompt(tok, fmt, ex.prompt)
    y_en, y_t = encode_response(tok, fmt, ex.response_en), encode_response(tok, fmt, ex.response)
    return EncodedExample(ex.id, [(x_en, y_en), (x_en, y_t), (x_t, y_t), (x_t, y_en)])


def encode_all(tok: Tokenizer, fmt: ChatFormat, examples: list[Example], max_length: int):
    """(kept encoded examples, number dropped as too long)."""
    encoded = [encode_example(tok, fmt, ex) for ex in examples]
    kept = [e for e in encoded if e.longest <= max_length]
    return kept, len(encoded) - len(kept)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def length_groups(lengths: list[int], groups: int) -> list[list[int]]:
    """Indices sorted by length, cut into `groups` runs of near-equal size (fewer when there are few)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups = max(1, min(groups, len(order)))
    bounds = [round(g * len(order) / groups) for g in range(groups + 1)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def flat_sequences(batch: list[EncodedExample], which=range(4)) -> list[tuple[list[int], list[int]]]:
    """The (prompt, response) pairs `which` of every example, ordered [all k0 | all k1 | ...]."""
    return [ex.sequences[k] for k in which for ex in batch]


def collate(batch: list[EncodedExample], pad_id: int, bucket: int = 64, which=range(4)):
    """tokens [k*B, T] and labels [k*B, T] for the sequences `which` (default all four)."""
    return collate_sequences(flat_sequences(batch, which), pad_id, bucket)


def collate_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int, bucket: int = 64):
    """tokens [N, T] and labels [N, T] for N (prompt, response) pairs, right-padded to a multiple of `bucket`.

    labels[i, t] is the token at t+1 when that token belongs to the response, else IGNORE_INDEX:
    the log-prob of a response token is read from the hidden state just before it.
    """
    T = round_up(max(len(p) + len(r) for p, r in seqs), bucket)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(seqs):
        ids = prompt + response
        tokens[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) - 1 : len(ids) - 1] = torch.tensor(response)
    return tokens, labels


def count_tokens(batch: list[EncodedExample], which=range(4)) -> int:
    """Non-padding tokens in the batch's sequences (what tokens/s counts)."""
    return sum(len(ex.sequences[k][0]) + len(ex.sequences[k][1]) for k in which for ex in batch)
