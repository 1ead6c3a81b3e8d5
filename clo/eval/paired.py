"""Paired differences: model A minus model B on the same held-out pairs and prompts, with 95% intervals.

Two models' intervals overlapping is not a test of their difference (clo/eval/bootstrap.py). When both
were evaluated on the same items, the difference itself is resampled: each resample draws one set of
items and computes both models' numbers on it, so what the two share (an easy pair, a prompt every
model answers in English) cancels, and the interval is that of A − B:

    held-out pairs (eval.py heldout.jsonl)     every number of clo/eval/preference.py, e.g. nll_t, margin_t
    answers (eval.py generations.jsonl)        per prompt language, the answer rates of clo/eval/generation.py
                                               (resampled within each prompt language, as there)

An interval that excludes 0 says the difference is larger than the resampling noise of this sample;
it says nothing of another seed or other training data (one trained model per cell).
"""

import numpy as np
import torch

from clo.errors import CloError
from clo.eval.bootstrap import intervals
from clo.eval.preference import preference_numbers
from clo.train.batching import SEQUENCE_NAMES


def heldout_table(rows: list[dict]) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """eval.py's heldout.jsonl lines of one model -> (ids, logps [N, 4], lengths [N, 4], same [N])."""
    ids = [r["id"] for r in rows]
    nan = float("nan")  # null in the file: a diverged model's log-prob (clo/jsonl.py)
    logps = torch.tensor([[nan if r["logp"][k] is None else r["logp"][k] for k in SEQUENCE_NAMES] for r in rows], dtype=torch.float64).reshape(-1, 4)
    lengths = torch.tensor([[r["tokens"][k] for k in SEQUENCE_NAMES] for r in rows], dtype=torch.float64).reshape(-1, 4)
    same = torch.tensor([r["same_answer"] for r in rows], dtype=torch.bool)
    return ids, logps, lengths, same


def heldout_differences(a_rows: list[dict], b_rows: list[dict]) -> dict[str, dict]:
    """{number: {"value": A − B, "ci95": [lo, hi]}} for every `preference_numbers` number, over the pairs
    both models scored (eval.py heldout.jsonl lines of A and of B)."""
    ids, a, a_len, same = heldout_table(a_rows)
    b_ids, b, b_len, _ = heldout_table(b_rows)
    if sorted(ids) != sorted(b_ids) or len(set(ids)) != len(ids):
        raise CloError("paired differences: the two models were scored on different held-out pairs")
    order = [b_ids.index(i) for i in ids]
    b, b_len = b[order], b_len[order]

    def difference(idx):
        picked = torch.from_numpy(np.asarray(idx))
        na = preference_numbers(a[picked], a_len[picked], same[picked])
        nb = preference_numbers(b[picked], b_len[picked], same[picked])
        return {k: (na[k] - nb[k]).numpy() for k in na}

    whole = difference(np.arange(len(ids))[None, :])
    ci = intervals(len(ids), difference)
    return {k: {"value": float(whole[k][0]), "ci95": ci[k]} for k in whole}


RATES = ("in_lang_rate", "degenerate_rate")


def answer_differences(a_records: list[dict], b_records: list[dict]) -> dict[str, dict[str, dict]]:
    """{prompt language: {rate: {"value": A − B, "ci95": [lo, hi]}}} of the share of answers in the
    prompt's language and the share that are degenerate, over the prompts both models answered
    (eval.py generations.jsonl records of A and of B, matched by set and id)."""

    def key(r):
        return r["set"], r["id"], r["prompt_lang"]

    b_by_key = {key(r): r for r in b_records}
    if len(b_by_key) != len(b_records) or sorted(map(key, a_records)) != sorted(b_by_key):
        raise CloError("paired differences: the two models answered different prompts")
    pairs = [(r, b_by_key[key(r)]) for r in a_records]
    langs = [a["prompt_lang"] for a, _ in pairs]
    grades = {  # [2 models, items]
        "in_lang_rate": np.array([[r["answer_lang"] == r["prompt_lang"] for r in side] for side in zip(*pairs)], dtype=np.float64),
        "degenerate_rate": np.array([[r["degenerate"] is not None for r in side] for side in zip(*pairs)], dtype=np.float64),
    }

    def difference(idx):
        out = {}
        for lang in dict.fromkeys(langs):
            mine = idx[:, np.array([langs[i] == lang for i in idx[0]])]  # strata keep each language's columns in place
            for rate, g in grades.items():
                out[f"{lang}/{rate}"] = g[0][mine].mean(1) - g[1][mine].mean(1)
        return out

    whole = difference(np.arange(len(pairs))[None, :])
    ci = intervals(len(pairs), difference, strata=langs)
    return {lang: {rate: {"value": float(whole[f"{lang}/{rate}"][0]), "ci95": ci[f"{lang}/{rate}"]} for rate in RATES}
            for lang in sorted(set(langs))}  # fmt: skip
