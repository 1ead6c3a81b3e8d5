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
on per-token mean log-probs, which is length-fair.

Likelihood (token-mean over the whole set, the SFT loss's normalisation):
    nll_t  = −Σ log π(y_t | x_t) / Σ |y_t|,   ppl_t  = exp(nll_t)
    nll_en = −Σ log π(y_en | x_en) / Σ |y_en|, ppl_en = exp(nll_en)
Per-token numbers compare models that share a tokenizer (base vs its fine-tunes), not across families.
"""

import math

import torch

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


def preference_metrics(logps: torch.Tensor, examples: list[EncodedExample]) -> dict:
    """The numbers of the module docstring from `four_way_logps` output [N, 4] and the examples' lengths."""
    lengths = torch.tensor([[len(response) for _, response in ex.sequences] for ex in examples], dtype=torch.float32)
    col = {name: k for k, name in enumerate(SEQUENCE_NAMES)}

    def direction(chosen: str, rejected: str) -> tuple[float, float, float]:
        c, r = logps[:, col[chosen]], logps[:, col[rejected]]
        c_tok, r_tok = c / lengths[:, col[chosen]], r / lengths[:, col[rejected]]
        return (c > r).float().mean().item(), (c - r).mean().item(), (c_tok > r_tok).float().mean().item()

    pref_t, margin_t, pref_t_tok = direction("t_t", "t_en")
    pref_en, margin_en, pref_en_tok = direction("en_en", "en_t")
    nll_t = -logps[:, col["t_t"]].sum().item() / lengths[:, col["t_t"]].sum().item()
    nll_en = -logps[:, col["en_en"]].sum().item() / lengths[:, col["en_en"]].sum().item()
    return {
        "n": len(examples),
        "pref_t": pref_t, "margin_t": margin_t, "pref_t_per_token": pref_t_tok,
        "pref_en": pref_en, "margin_en": margin_en, "pref_en_per_token": pref_en_tok,
        "nll_t": nll_t, "ppl_t": math.exp(nll_t), "nll_en": nll_en, "ppl_en": math.exp(nll_en),
    }  # fmt: skip
