"""Held-out preference and likelihood: what CLO optimizes, measured on held-out pairs without generating.

For each held-out pair (x_en, y_en, x_t, y_t), one forward pass scores the four sequences of
clo/train/batching.py, giving sequence log-probs log π(y|x) (sums over response tokens, end-of-turn
included, as in training):

    target direction   pref_t  = share of pairs with log π(y_t | x_t)   > log π(y_en | x_t)
                       margin_t = mean of log π(y_t | x_t) − log π(y_en | x_t)
    English direction  pref_en = share of pairs with log π(y_en | x_en) > log π(y_t | x_en)
                       margin_en = mean of log π(y_en | x_en) − log π(y_t | x_en)

These are the two preferences of L_CL (docs/paper.md "Loss") on the policy's own log-probs: CLO's
implicit reward is this margin minus the reference model's, so comparing a trained model's margin
with its starting model's (two rows of the report) shows what training moved. Sums favour the shorter
answer, and y_t is usually longer in tokens than y_en, so `pref_*_per_token` repeats the comparison
on per-token mean log-probs, which is length-fair. A pair whose two answers are the same tokens (a
name, a number, a sentence left untranslated: `same_answers`) has no preference to measure: it counts
½ in every preference and 0 in every margin, where its two log-probs would differ by rounding alone.

Likelihood (token-mean over the whole set, the SFT loss's normalisation):
    nll_t  = −Σ log π(y_t | x_t) / Σ |y_t|,   ppl_t  = exp(nll_t)
    nll_en = −Σ log π(y_en | x_en) / Σ |y_en|, ppl_en = exp(nll_en)
Per-token numbers compare models that share a tokenizer (base vs its fine-tunes), not across families.
"""

import math

import torch

from clo.eval.bootstrap import intervals
from clo.model.decoder import Transformer
from clo.train.batching import SEQUENCE_NAMES, EncodedExample
from clo.train.scoring import Batching, example_logps
from clo.world import World


def four_way_logps(model: Transformer, examples: list[EncodedExample], pad_id: int, batch_size: int, bucket: int = 8,
                   world: World = World()) -> torch.Tensor:
    """log π(y|x) of every sequence: [N, 4] float32, columns in SEQUENCE_NAMES order (en_en, en_t, t_t, t_en),
    scored exactly as training scores them (clo.train.scoring.example_logps; N processes share the
    batches and all get the whole table)."""
    batching = Batching.resolve(pad_id, bucket, 1, model.embed_tokens.weight.device, compiled=False)  # packed where training packs
    return example_logps(model, examples, batching, batch_size, desc="held-out log-probs", world=world)


def response_lengths(examples: list[EncodedExample]) -> torch.Tensor:
    """[N, 4] float32: response tokens of each example's four sequences (SEQUENCE_NAMES order)."""
    return torch.tensor([[len(response) for _, response in ex.sequences] for ex in examples], dtype=torch.float32)


def same_answers(examples: list[EncodedExample]) -> torch.Tensor:
    """[N] bool: the example's two answers, y_t and y_en, are the same token ids."""
    col = {name: k for k, name in enumerate(SEQUENCE_NAMES)}
    return torch.tensor([ex.sequences[col["t_t"]][1] == ex.sequences[col["t_en"]][1] for ex in examples], dtype=torch.bool)


def preference_metrics(logps: torch.Tensor, examples: list[EncodedExample]) -> dict:
    """The numbers of the module docstring from `four_way_logps` output [N, 4] and the examples' lengths."""
    same = same_answers(examples)
    m = {k: v.item() for k, v in preference_numbers(logps, response_lengths(examples), same).items()}
    return {
        "n": len(examples), "same_answers": int(same.sum()),
        "pref_t": m["pref_t"], "margin_t": m["margin_t"], "pref_t_per_token": m["pref_t_per_token"],
        "pref_en": m["pref_en"], "margin_en": m["margin_en"], "pref_en_per_token": m["pref_en_per_token"],
        "nll_t": m["nll_t"], "ppl_t": math.exp(m["nll_t"]), "nll_en": m["nll_en"], "ppl_en": math.exp(m["nll_en"]),
    }  # fmt: skip


def preference_numbers(logps: torch.Tensor, lengths: torch.Tensor, same: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The module docstring's numbers over the pair dimension: logps, lengths [..., N, 4] and same
    [..., N] (`same_answers`; None: no pair has one answer twice) -> each [...] (one set of pairs, or
    a batch of resamples of them)."""
    col = {name: k for k, name in enumerate(SEQUENCE_NAMES)}
    same = torch.zeros(logps.shape[:-1], dtype=torch.bool) if same is None else same

    def prefer(c, r):  # 1 where c wins, ½ where the answers are one and the same; NaN where a log-prob is (no winner)
        wins = torch.where(c.isnan() | r.isnan(), float("nan"), (c > r).float())
        return torch.where(same, 0.5, wins).mean(-1)

    out = {}
    for d, chosen, rejected in (("t", "t_t", "t_en"), ("en", "en_en", "en_t")):
        c, r = logps[..., col[chosen]], logps[..., col[rejected]]
        c_tok, r_tok = c / lengths[..., col[chosen]], r / lengths[..., col[rejected]]
        out[f"pref_{d}"] = prefer(c, r)
        out[f"margin_{d}"] = torch.where(same, 0.0, c - r).mean(-1)
        out[f"pref_{d}_per_token"] = prefer(c_tok, r_tok)
        out[f"nll_{d}"] = -c.sum(-1) / lengths[..., col[chosen]].sum(-1)
    return out


def preference_intervals(logps: torch.Tensor, examples: list[EncodedExample]) -> dict[str, list[float] | None]:
    """95% bootstrap interval of each `preference_numbers` number over the held-out pairs (clo/eval/bootstrap.py)."""
    lengths, same = response_lengths(examples), same_answers(examples)

    def statistic(idx):
        picked = torch.from_numpy(idx)
        return {k: v.numpy() for k, v in preference_numbers(logps[picked], lengths[picked], same[picked]).items()}

    return intervals(len(examples), statistic)


def heldout_rows(name: str, logps: torch.Tensor, examples: list[EncodedExample]) -> list[dict]:
    """One line per held-out pair for eval.py's heldout.jsonl: the four sequence log-probs and response
    lengths by SEQUENCE_NAMES, and whether its two answers are the same (what paired differences need)."""
    lengths, same = response_lengths(examples), same_answers(examples)
    return [{"model": name, "id": ex.id, "logp": dict(zip(SEQUENCE_NAMES, map(float, lp))),
             "tokens": dict(zip(SEQUENCE_NAMES, map(int, n))), "same_answer": bool(s)}
            for ex, lp, n, s in zip(examples, logps.tolist(), lengths.tolist(), same.tolist())]  # fmt: skip
