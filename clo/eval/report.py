"""The comparison report: one markdown table across checkpoints, the same numbers as JSON, an optional plot.

Input: one results dict per model, as eval.py builds them:

    {"name", "model",
     "fidelity": {lang: {...}},            clo/eval/generation.py `fidelity`, all prompt sets pooled
     "fidelity_by_set": {set: {lang: {...}}},
     "preference": {...} | None,           clo/eval/preference.py
     "mc": {...} | None,                   clo/eval/mc.py
     "judge": {"against": name, ...} | None}   clo/eval/judge.py summary

The PNG (report.png) is drawn with matplotlib (a requirement since study.py plots too).
All files are written atomically (temp file, then rename), so a crash never leaves half a report.
"""

import json
from pathlib import Path

from clo.atomic import atomic_file, write_atomic
from clo.jsonl import dumps_line, finite_or_null


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(dumps_line(r) for r in rows))


def write_json(path: Path, data) -> None:
    """Standard JSON: NaN and infinities (a diverged model's numbers) as null."""
    write_atomic(path, json.dumps(finite_or_null(data), ensure_ascii=False, indent=2, allow_nan=False) + "\n")


def prompt_langs(results: list[dict], target: str) -> list[str]:
    """The prompt languages present, the target first, then English, then the rest."""
    present = {lang for r in results for lang in r["fidelity"]}
    return [lang for lang in (target, "en") if lang in present] + sorted(present - {target, "en"})


def _pct(rate) -> str:
    return "–" if rate is None else f"{100 * rate:.1f}%"


def _count(k: int, n: int) -> str:
    return f"{_pct(k / n if n else None)} ({k}/{n})"


def _num(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main_table(results: list[dict], target: str) -> str:
    """One markdown row per model: fidelity per prompt language, held-out preference, NLL, MC, win rate."""
    langs = prompt_langs(results, target)
    header = ["model"]
    for lang in langs:
        header += [f"{lang} prompts: in {lang}", f"in {lang}, non-degenerate", "degenerate"]
    header += [f"pref {target}", f"margin {target}", "pref en", "margin en", f"NLL {target}", "NLL en", "MC acc", "win rate"]
    rows = []
    for r in results:
        row = [r["name"]]
        for lang in langs:
            f = r["fidelity"].get(lang)
            if f is None:
                row += ["–", "–", "–"]
            else:
                row += [_count(f["in_lang"], f["n"]), _count(f["in_lang_ok"], f["n_ok"]), _count(f["degenerate"], f["n"])]
        p = r.get("preference") or {}
        row += [_pct(p.get("pref_t")), _num(p.get("margin_t")), _pct(p.get("pref_en")), _num(p.get("margin_en"))]
        row += [_num(p.get("nll_t"), 3), _num(p.get("nll_en"), 3)]
        mc = r.get("mc")
        row.append("–" if mc is None else _count(round(mc["accuracy"] * mc["n"]), mc["n"]))
        j = r.get("judge")
        row.append("–" if j is None else f"{_pct(j['win_rate'])} vs {j['against']}")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def answer_language_table(results: list[dict], target: str) -> str:
    """Counts of the language each model answered in, per prompt language."""
    langs = prompt_langs(results, target)
    answer_langs = sorted({a for r in results for f in r["fidelity"].values() for a in f["answer_langs"]})
    header = ["model", "prompt lang", *answer_langs, "n", "empty / copy / repeat", "hit max tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        for lang in langs:
            f = r["fidelity"].get(lang)
            if f is None:
                continue
            reasons = f["degenerate_by_reason"]
            degenerate = " / ".join(str(reasons.get(k, 0)) for k in ("empty", "copy", "repeat"))
            cells = [r["name"], lang, *(str(f["answer_langs"].get(a, 0)) for a in answer_langs), str(f["n"]), degenerate, str(f["hit_max_new_tokens"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mc_table(results: list[dict]) -> str | None:
    with_mc = [r for r in results if r.get("mc")]
    if not with_mc:
        return None
    subjects = sorted({s for r in with_mc for s in r["mc"]["subjects"]})
    header = ["model", *subjects, "overall (micro)", "macro"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in with_mc:
        mc = r["mc"]
        cells = [_pct(mc["subjects"][s]["accuracy"]) if s in mc["subjects"] else "–" for s in subjects]
        lines.append("| " + " | ".join([r["name"], *cells, _pct(mc["accuracy"]), _pct(mc["macro_accuracy"])]) + " |")
    return "\n".join(lines)


def markdown_report(results: list[dict], target: str, settings: dict) -> str:
    parts = [
        f"# Evaluation: target language {target}",
        "",
        main_table(results, target),
        "",
        "Columns: share of prompts answered in the prompt's language (over all answers, and over the "
        "non-degenerate ones), share of degenerate answers (empty, copying the prompt, or repeating "
        "itself); on held-out pairs, the share preferring the answer in the prompt's language "
        "(`pref`, sequence log-probs) and the mean log-prob margin, and the per-token NLL of the "
        "reference answers; multiple-choice accuracy; pairwise win rate (both presentation orders).",
        "",
        "## Answer languages",
        "",
        answer_language_table(results, target),
    ]
    mc = mc_table(results)
    if mc:
        parts += ["", "## Multiple choice, per subject", "", mc]
    parts += ["", "## Settings", "", "```json", json.dumps(settings, ensure_ascii=False, indent=2), "```", ""]
    return "\n".join(parts)


def plot_main_numbers(results: list[dict], target: str, path: Path) -> None:
    """A grouped bar chart of the main rates per model into `path` (PNG)."""
    import matplotlib  # imported here: a second of start-up that only plotting needs

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    metrics = {}
    for lang in prompt_langs(results, target):
        metrics[f"{lang} prompts: in {lang}"] = [(r["fidelity"].get(lang) or {}).get("in_lang_rate") for r in results]
        metrics[f"{lang}: non-degenerate"] = [(r["fidelity"].get(lang) or {}).get("in_lang_rate_ok") for r in results]
    metrics[f"pref {target}"] = [(r.get("preference") or {}).get("pref_t") for r in results]
    metrics["pref en"] = [(r.get("preference") or {}).get("pref_en") for r in results]
    metrics["MC acc"] = [(r.get("mc") or {}).get("accuracy") for r in results]
    metrics["win rate"] = [(r.get("judge") or {}).get("win_rate") for r in results]
    metrics = {k: v for k, v in metrics.items() if any(x is not None for x in v)}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(1, len(results)) / 2), 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [m + i * width for m in range(len(metrics))]
        ax.bar(xs, [100 * (v[i] or 0) for v in metrics.values()], width, label=r["name"])
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], list(metrics), rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"eval.py, target language {target}: answers in the prompt's language, held-out preference", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
