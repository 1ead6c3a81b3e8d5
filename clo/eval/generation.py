"""Answer prompt sets with a model, then grade each answer: its language, and whether it is degenerate.

Prompts are formatted exactly as in training (clo/model/chat.py) and answered greedily in batches of
similar length with the KV-cached generator (clo/model/generate.py). Each answer becomes one record:

    {"model", "set", "id", "prompt_lang", "prompt", "answer", "answer_lang", "n_tokens",
     "hit_max_new_tokens", "copy_score", "repeat_score", "degenerate": null | "empty" | "copy" | "repeat"}

Language fidelity, per prompt language (`fidelity`):
    in_lang_rate     = answers in the prompt's language / all answers
    in_lang_rate_ok  = the same over the non-degenerate answers only (None when there are none)
    degenerate_rate  = degenerate answers / all answers (with counts per reason)
For target-language prompts this is "answers in the target language"; for English prompts,
"English is kept".
"""

from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from clo.eval.bootstrap import intervals
from clo.eval.degenerate import COPY_THRESHOLD, NGRAM, REPEAT_THRESHOLD, classify_answer
from clo.eval.langid import LanguageId
from clo.eval.prompts import EvalPrompt
from clo.model.chat import ChatFormat, encode_prompt, stop_ids
from clo.model.decoder import Transformer
from clo.model.generate import generate
from clo.model.tokenizer import Tokenizer
from clo.world import World


@torch.no_grad()
def generate_answers(
    model: Transformer, tok: Tokenizer, fmt: ChatFormat, prompts: list[EvalPrompt], max_new_tokens: int, batch_size: int, desc: str = "generate",
    compile: bool = False, world: World = World(),
) -> list[tuple[str, int]]:
    """Greedy answers, in the order of `prompts`: (text, number of new tokens, stop token excluded).

    compile: decode with clo.model.generate's compiled static-shape step (one compile per batch shape).
    world: N processes (torchrun) take the length-sorted batches in turn, the same batches one process
    forms, so each answer is the one a single process gives; every process gets all the answers.
    """
    encoded = [encode_prompt(tok, fmt, p.text) for p in prompts]
    stops = stop_ids(tok, fmt)
    # similar lengths in one batch: less left padding to compute over
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = {}
    for b in tqdm(world.turns(len(batches)), desc=desc, unit="batch", disable=not world.main):
        outputs = generate(model, [encoded[i] for i in batches[b]], max_new_tokens, stops, tok.pad_id, compile=compile)
        mine.update({i: (tok.decode(ids), len(ids)) for i, ids in zip(batches[b], outputs)})
    model.clear_cache()  # a compiled decode keeps its cache between calls
    answers = world.merge(mine)
    return [answers[i] for i in range(len(prompts))]


def grade_answers(
    model_name: str,
    prompts: list[EvalPrompt],
    answers: list[tuple[str, int]],
    langid: LanguageId,
    max_new_tokens: int,
    copy_threshold: float = COPY_THRESHOLD,
    repeat_threshold: float = REPEAT_THRESHOLD,
    ngram: int = NGRAM,
) -> list[dict]:
    """One record per answer (module docstring)."""
    records = []
    for p, (text, n_tokens) in zip(prompts, answers, strict=True):
        verdict = classify_answer(p.text, text, copy_threshold, repeat_threshold, ngram)
        records.append({
            "model": model_name, "set": p.set, "id": p.id, "prompt_lang": p.lang, "prompt": p.text,
            "answer": text, "answer_lang": langid.identify(text), "n_tokens": n_tokens,
            # an answer cut at the limit did not stop by itself: a hint of looping, or a limit set too low
            "hit_max_new_tokens": n_tokens >= max_new_tokens,
            "copy_score": verdict.copy_score, "repeat_score": verdict.repeat_score, "degenerate": verdict.reason,
        })  # fmt: skip
    return records


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def fidelity(records: list[dict]) -> dict[str, dict]:
    """Per prompt language: counts and rates of answers in that language, over all and non-degenerate answers."""
    out = {}
    for lang in sorted({r["prompt_lang"] for r in records}):
        rows = [r for r in records if r["prompt_lang"] == lang]
        ok = [r for r in rows if r["degenerate"] is None]
        in_lang = sum(r["answer_lang"] == lang for r in rows)
        in_lang_ok = sum(r["answer_lang"] == lang for r in ok)
        reasons = Counter(r["degenerate"] for r in rows if r["degenerate"] is not None)
        out[lang] = {
            "n": len(rows),
            "in_lang": in_lang,
            "in_lang_rate": _rate(in_lang, len(rows)),
            "n_ok": len(ok),
            "in_lang_ok": in_lang_ok,
            "in_lang_rate_ok": _rate(in_lang_ok, len(ok)),
            "degenerate": len(rows) - len(ok),
            "degenerate_rate": _rate(len(rows) - len(ok), len(rows)),
            "degenerate_by_reason": dict(sorted(reasons.items())),
            "hit_max_new_tokens": sum(r["hit_max_new_tokens"] for r in rows),
            "answer_langs": dict(Counter(r["answer_lang"] for r in rows).most_common()),
        }
    return out


def fidelity_intervals(records: list[dict]) -> dict[str, dict[str, list[float] | None]]:
    """Per prompt language, the 95% bootstrap interval of each rate of `fidelity` over the answers,
    resampled within each prompt language (clo/eval/bootstrap.py)."""
    in_lang = np.array([r["answer_lang"] == r["prompt_lang"] for r in records], dtype=np.float64)
    ok = np.array([r["degenerate"] is None for r in records], dtype=np.float64)
    langs = [r["prompt_lang"] for r in records]

    def statistic(idx):
        out = {}
        for lang in dict.fromkeys(langs):
            mine = idx[:, np.array([langs[i] == lang for i in idx[0]])]  # strata keep each language's columns in place
            a, o = in_lang[mine], ok[mine]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{lang}/in_lang_rate"] = a.mean(1)
                out[f"{lang}/in_lang_rate_ok"] = (a * o).sum(1) / o.sum(1)  # NaN where a resample has no such answer
                out[f"{lang}/degenerate_rate"] = 1 - o.mean(1)
        return out

    flat = intervals(len(records), statistic, strata=langs)
    keys = ("in_lang_rate", "in_lang_rate_ok", "degenerate_rate")
    return {lang: {k: flat.get(f"{lang}/{k}") for k in keys} for lang in sorted(set(langs))}
