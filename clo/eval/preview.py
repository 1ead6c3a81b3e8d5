"""A few answers before and after training: the main job shows its effect without another command.

train.py answers the first `n` target-language prompts of the language's held-out demo set
(data/demo/<lang>.heldout.jsonl, never trained on) greedily, once with the starting model and once
with the trained one, and prints both with the language each answer is in (clo/eval/langid.py)
and the share answered in the target language. A handful of answers is a glimpse, not a
measurement: eval.py and study.py measure.
"""

import sys

import torch

from clo.eval.degenerate import classify_answer
from clo.eval.generation import generate_answers
from clo.eval.langid import LanguageId
from clo.eval.prompts import EvalPrompt, load_prompts
from clo.languages import get_language
from clo.model.chat import ChatFormat
from clo.model.decoder import Transformer
from clo.model.tokenizer import Tokenizer
from clo.pairs import demo_path

MAX_NEW_TOKENS = 64  # long enough to tell the language, short enough to cost seconds


def preview_prompts(lang: str, n: int) -> list[EvalPrompt]:
    """The first n target-language prompts of the held-out demo set."""
    return [p for p in load_prompts(demo_path(lang, heldout=True)) if p.lang == lang][:n]


def answer(model: Transformer, tok: Tokenizer, fmt: ChatFormat, prompts: list[EvalPrompt], langid: LanguageId) -> list[tuple[str, str, str | None]]:
    """(answer, its language, why it is degenerate or None) per prompt: greedy, eager (compiled blocks would
    build a graph per decode length); degenerate: empty, a copy of the prompt or a loop (clo/eval/degenerate.py)."""
    was_training = model.training
    model.eval()
    with torch.compiler.set_stance("force_eager"):
        answers = generate_answers(model, tok, fmt, prompts, MAX_NEW_TOKENS, batch_size=len(prompts), desc="preview answers")
    model.train(was_training)
    return [(text, langid.identify(text), classify_answer(p.text, text).reason) for p, (text, _) in zip(prompts, answers, strict=True)]


class Preview:
    """The starting model's answers, taken when made (before training); `show(trained)` prints both.
    n = 0: nothing is answered or printed."""

    def __init__(self, model: Transformer, tok: Tokenizer, fmt: ChatFormat, lang: str, n: int):
        self.tok, self.fmt, self.lang = tok, fmt, lang
        self.prompts = preview_prompts(lang, n) if n else []
        self.langid = LanguageId() if self.prompts else None
        self.before = answer(model, tok, fmt, self.prompts, self.langid) if self.prompts else []

    def show(self, trained: Transformer, file=None) -> None:
        if self.prompts:
            print_preview(self.prompts, self.before, answer(trained, self.tok, self.fmt, self.prompts, self.langid), self.lang, file)


def print_preview(prompts: list[EvalPrompt], before: list[tuple[str, str, str | None]], after: list[tuple[str, str, str | None]], lang: str, file=None) -> None:
    """Each prompt with both answers, then the share in the target language before and after."""
    name, file = get_language(lang).name, file or sys.stderr

    def short(text: str, width: int) -> str:
        text = " ".join(text.split()) or "(empty)"
        return text if len(text) <= width else text[: width - 1] + "…"

    print(f"\n{len(prompts)} held-out {name} prompts (data/demo/{lang}.heldout.jsonl), greedy answers of at most {MAX_NEW_TOKENS} tokens:", file=file)
    for p, b, a in zip(prompts, before, after, strict=True):
        print(f"  prompt        {short(p.text, 100)}", file=file)
        for when, (text, answer_lang, reason) in (("before", b), ("after ", a)):
            print(f"  {when} [{answer_lang}{', ' + reason if reason else ''}]  {short(text, 100)}", file=file)

    def count(graded):
        return sum(x == lang for _, x, _ in graded), sum(x == lang and r is None for _, x, r in graded)

    (b_all, b_ok), (a_all, a_ok) = count(before), count(after)
    n = len(prompts)
    print(f"answered in {name}: {b_all}/{n} before training ({b_ok} not degenerate), {a_all}/{n} after ({a_ok} not degenerate); "
          f"eval.py measures more prompts, study.py methods and sizes", file=file)  # fmt: skip
