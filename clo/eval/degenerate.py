"""Degenerate answers: empty, a copy of the prompt, or a loop on one phrase.

A small English-centric model given a Swahili prompt often echoes the prompt back or repeats one
phrase until it runs out of tokens. A language identifier calls such an answer Swahili, so language
fidelity alone would reward it; eval.py therefore reports fidelity over all answers and over the
non-degenerate ones.

Both scores work on n-grams of "units": a unit is a word (a run of letters/digits), or a single
character in scripts written without spaces (Chinese, Japanese kana), so they mean the same in all
seven languages.

    copy score   = share of the answer's n-grams that also occur in the prompt        (0 .. 1)
    repeat score = 1 − distinct n-grams / all n-grams of the answer                   (0 .. 1)

An answer copies the prompt when its copy score is >= `copy_threshold` (default 0.5: half of what
it says is lifted from the prompt), and repeats itself when its repeat score is >= `repeat_threshold`
(default 0.5: half of its n-grams were already said) or when it loops inside a word, a stretch of
2-4 letters said 4 times in a row ("Nangababababa": word n-grams cannot see it; digits are exempt,
so 100000 is not a loop). n = 3 by default; an answer shorter than n
units is scored with n = its length. Real answers score near 0 on both (tests/test_eval_degenerate.py
checks the demo held-out responses).
"""

import re
from dataclasses import dataclass

# One unspaced-script character, or one run of letters/digits.
_UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")

# 2-4 letters (no digits), then the same 3 or more times: "babababa"
_CHARACTER_LOOP = re.compile(r"([^\W\d_]{2,4})\1{3,}")

COPY_THRESHOLD = 0.5
REPEAT_THRESHOLD = 0.5
NGRAM = 3


def units(text: str) -> list[str]:
    return _UNIT.findall(text.lower())


def ngrams(items: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def copy_score(prompt: str, answer: str, n: int = NGRAM) -> float:
    """Share of the answer's n-grams found in the prompt (0 for an answer with no units)."""
    answer_units = units(answer)
    if not answer_units:
        return 0.0
    n = min(n, len(answer_units))
    prompt_grams = set(ngrams(units(prompt), n))
    answer_grams = ngrams(answer_units, n)
    return sum(g in prompt_grams for g in answer_grams) / len(answer_grams)


def repeat_score(answer: str, n: int = NGRAM) -> float:
    """1 − distinct/total n-grams of the answer (0 for an answer with fewer than n + 1 units)."""
    grams = ngrams(units(answer), n)
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass(frozen=True)
class Verdict:
    copy_score: float
    repeat_score: float
    reason: str | None  # "empty", "copy", "repeat", or None for a usable answer

    @property
    def degenerate(self) -> bool:
        return self.reason is not None


def classify_answer(
    prompt: str, answer: str, copy_threshold: float = COPY_THRESHOLD, repeat_threshold: float = REPEAT_THRESHOLD, n: int = NGRAM
) -> Verdict:
    """Score an answer; the reason is the first that applies of empty, copy, repeat."""
    copied, repeated = copy_score(prompt, answer, n), repeat_score(answer, n)
    if not units(answer):
        reason = "empty"
    elif copied >= copy_threshold:
        reason = "copy"
    elif repeated >= repeat_threshold or _CHARACTER_LOOP.search(answer.lower()):
        reason = "repeat"
    else:
        reason = None
    return Verdict(round(copied, 4), round(repeated, 4), reason)
