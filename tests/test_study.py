"""study.py end to end on a tiny model: 2 sizes x 2 methods with a learning-rate sweep, its tables
against the cells' own eval.py files, its plot, resume after an interruption, and bad arguments."""

import json
import struct
from pathlib import Path

import pytest
from tiny_chat_model import make_tiny_training_setup

import study
import train
from clo.errors import CloError
from clo.pairs import demo_path, load_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES, METHODS, LRS = (4, 8), ("clo", "sft"), (1e-3, 3e-3)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ChatML model and a file of 16 Swahili demo pairs (4 dev + 12 to train on)."""
    return make_tiny_training_setup(tmp_path_factory.mktemp("tiny"), n_examples=16)


def argv(tiny, out, *extra):
    folder, pairs = tiny
    return ["--lang", "sw", "--model", str(folder), "--pairs", str(pairs), "--sizes", *map(str, SIZES), "--methods", *METHODS,
            "--lrs", *map(str, LRS), "--dev", "4", "--batch-size", "4", "--max-new-tokens", "8", "--eval-limit", "4",
            "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "study.jsonl").read_text(encoding="utf-8").splitlines()]


def tables(md: str) -> dict[str, dict[str, list[str]]]:
    """study.md's metric tables: {section title: {method: [cells of columns 0, sizes...]}}."""
    found, title = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("| ") and title and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            found.setdefault(title, {})[cells[0]] = cells[1:]
    return found


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One uninterrupted study, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("study") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLO_CACHE", str(out.parent / "cache"))
        study.main(argv(tiny, out))
    return out


def test_every_cell_is_trained_and_evaluated(finished, tiny):
    got = rows(finished)
    assert [(r["method"], r["size"]) for r in got if r["kind"] == "base"] == [("base", 0)]
    assert sorted((r["method"], r["size"]) for r in got if r["kind"] == "cell") == sorted((m, n) for m in METHODS for n in SIZES)
    sweep = [r for r in got if r["kind"] == "sweep"]
    assert sorted((r["method"], r["lr"]) for r in sweep) == sorted((m, lr) for m in METHODS for lr in LRS)
    for m in METHODS:  # one learning rate per method, the lowest dev NLL of those not broken, used by every cell of that method
        best = min((r for r in sweep if r["method"] == m and not r["broken"]), key=lambda r: r["dev_score"])
        assert [r["lr"] for r in sweep if r["method"] == m and r["chosen"]] == [best["lr"]]
        assert {r["lr"] for r in got if r["kind"] == "cell" and r["method"] == m} == {best["lr"]}
    for r in (r for r in got if r["kind"] == "cell"):
        run = json.loads((Path(r["cell"]) / "run.json").read_text())
        assert (run["method"], run["examples"], run["lr"]) == (r["method"], r["size"], r["lr"])

    # the split: dev and pool partition the pairs, a larger size holds the smaller, held-out is apart
    ids = lambda path: [ex.id for ex in load_pairs(path).examples]  # noqa: E731
    dev, pool = ids(finished / "data" / "dev.jsonl"), ids(finished / "data" / "pool.jsonl")
    assert len(dev) == 4 and sorted(dev + pool) == sorted(ids(tiny[1]))
    assert not set(dev + pool) & set(ids(demo_path("sw", heldout=True)))
    # the sweep ran at the largest size, scored the dev split and answered the dev prompts, nothing of the held-out set
    assert {r["size"] for r in sweep} == {max(SIZES)}
    dev_prompts = {(i, lang) for i in dev for lang in ("sw", "en")}
    for folder in ["dev-base", *(f"dev-{Path(r['cell']).name}" for r in sweep)]:
        dev_eval = finished / "eval" / folder
        assert json.loads((dev_eval / "metrics.json").read_text())["settings"]["heldout"] == str(finished / "data" / "dev.jsonl")
        answered = [json.loads(line) for line in (dev_eval / "generations.jsonl").read_text().splitlines()]
        assert {(a["id"], a["prompt_lang"]) for a in answered} == dev_prompts, folder


def test_tables_show_the_cells_own_eval_numbers(finished):
    """Every number of study.md is the one in that cell's eval.py metrics.jsonl (read here without study.py's code)."""
    md = tables((finished / "study.md").read_text(encoding="utf-8"))
    metrics = {}
    for folder in ["base", *(f"n{n}" for n in SIZES)]:
        for line in (finished / "eval" / folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            result = json.loads(line)
            metrics[folder, result["name"]] = result
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    num = lambda x: f"{x:.3f}"  # noqa: E731
    expected = {
        "sw prompts answered in sw": lambda r: pct(r["fidelity"]["sw"]["in_lang_rate"]),
        "degenerate answers to sw prompts": lambda r: pct(r["fidelity"]["sw"]["degenerate_rate"]),
        "en prompts answered in en": lambda r: pct(r["fidelity"]["en"]["in_lang_rate"]),
        "NLL of held-out sw answers": lambda r: num(r["preference"]["nll_t"]),
        "NLL of held-out en answers": lambda r: num(r["preference"]["nll_en"]),
        "held-out pairs preferring y_sw given x_sw": lambda r: pct(r["preference"]["pref_t"]),
        "margin given x_sw": lambda r: num(r["preference"]["margin_t"]),
        "margin given x_en": lambda r: num(r["preference"]["margin_en"]),
    }
    for title, value in expected.items():
        for m in METHODS:
            numbers = [cell.split(" [")[0] for cell in md[title][m]]
            assert numbers == [value(metrics["base", "base"]), *(value(metrics[f"n{n}", m]) for n in SIZES)], (title, m)
    # each number's 95% interval, as eval.py computed it (its ci95), in brackets after it
    low, high = metrics["n8", "clo"]["ci95"]["preference"]["nll_t"]
    assert md["NLL of held-out sw answers"]["clo"][2] == f"{num(metrics['n8', 'clo']['preference']['nll_t'])} [{num(low)}, {num(high)}]"
    low, high = metrics["base", "base"]["ci95"]["fidelity"]["en"]["in_lang_rate"]
    assert md["en prompts answered in en"]["clo"][0].endswith(f" [{100 * low:.1f}, {100 * high:.1f}]")
    sweep = {r["lr"]: r["dev_score"] for r in rows(finished) if r["kind"] == "sweep" and r["method"] == "clo"}
    assert [cell.split(" ")[0] for cell in md["Learning rates"]["clo"][:-1]] == [f"{sweep[lr]:.4f}" for lr in LRS]


def test_differences_against_sft_are_paired_on_the_cells_eval_files(finished):
    """Each size's clo − sft row: its values are the cells' numbers subtracted (a paired difference's
    point is the difference of the points), its interval holds the value, and study.md shows it."""
    got = rows(finished)
    cells = {(r["method"], r["size"]): r["metrics"] for r in got if r["kind"] == "cell"}
    diffs = {r["size"]: r for r in got if r["kind"] == "difference"}
    assert sorted(diffs) == list(SIZES) and {(r["method"], r["against"]) for r in diffs.values()} == {("clo", "sft")}
    paired = ("in_t", "degenerate_t", "en_in_en", "nll_t", "nll_en", "pref_t", "pref_t_per_token", "margin_t", "pref_en", "margin_en")
    for n, r in diffs.items():
        assert {k for k, v in r["metrics"].items() if v is not None} == set(paired)
        for key in paired:
            assert r["metrics"][key] == pytest.approx(cells["clo", n][key] - cells["sft", n][key], abs=1e-6), (n, key)
            lo, hi = r["ci95"][key]
            assert lo - 1e-9 <= r["metrics"][key] <= hi + 1e-9, (n, key)
    md = tables((finished / "study.md").read_text(encoding="utf-8"))["clo − sft, paired"]
    nll = diffs[max(SIZES)]["metrics"]["nll_t"]
    assert md["NLL of held-out sw answers (lower is better)"][-1].strip("*").startswith(f"{nll:+.3f}")


def test_plot_is_a_png_of_one_panel_per_metric(finished):
    # 11 metrics without a judge: 3 rows of 4 panels, 4.0 x 3.0 inches each at 100 dpi
    assert png_size(finished / "study.png") == (1600, 900)


def test_interrupted_study_resumes_without_training_a_finished_cell_twice(tiny, tmp_path, monkeypatch, finished):
    """Ctrl-C in the middle of the 5th cell (after its first checkpoint): the rerun trains only what
    was left, resumes that cell from its checkpoint, and ends with the uninterrupted study's numbers."""
    real_train, calls = train.main, []

    def interrupted(args):
        calls.append(args)
        if len(calls) == 5:
            real_train([*args, "--max-steps", "1"])  # one step, checkpointed; then the "kill": its model never saved
            out = Path(args[args.index("--out") + 1])
            assert (out / "checkpoint.pt").is_file()
            for f in (out / "model").iterdir():
                f.unlink()
            (out / "model").rmdir()
            raise KeyboardInterrupt
        return real_train(args)

    monkeypatch.setattr(train, "main", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        study.main(argv(tiny, out))
    first = [a[a.index("--out") + 1] for a in calls]
    assert all(a[a.index("--show-answers") + 1] == "0" for a in calls)  # eval.py measures the cells: no preview
    calls.clear()
    study.main(argv(tiny, out))
    again = [a[a.index("--out") + 1] for a in calls]
    assert again[0] == first[-1] and "--resume" in calls[0]  # the interrupted cell, from its checkpoint
    assert not set(again) & set(first[:-1])  # no finished cell trained twice
    assert len(first) - 1 + len(again) == len(LRS) * len(METHODS) + len(METHODS)  # sweep + the other size, each once

    def numbers(path):
        return [(r["kind"], r["method"], r["size"], r["lr"], r.get("metrics"), r.get("ci95"), r.get("dev_score")) for r in rows(path)]

    assert numbers(out) == numbers(finished)
    calls.clear()
    study.main(argv(tiny, out))  # everything done: nothing trained, nothing evaluated again
    assert calls == []
    assert numbers(out) == numbers(finished)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--sizes", "4", "13"), "--sizes/--sweep-size 13: "),
        (("--judge", "somewhere", "--methods", "clo"), "--judge: win rates are against the SFT cell"),
        (("--lrs", "0"), "--lrs 0.0: every learning rate must be a positive number"),
        (("--dev", "0"), "--dev 0: a sweep of 2 learning rates needs dev pairs"),
        (("--methods", "clo", "clo"), "a method is named twice"),
        (("--heldout", "missing.jsonl"), "missing.jsonl"),
        (("--stages", "bogus:1"), "bogus"),
    ],
)
def test_bad_arguments_stop_before_any_training(tiny, tmp_path, extra, message):
    out = tmp_path / "run"
    args = argv(tiny, out)
    for flag in extra[::2]:  # replace the flag's default value(s)
        if flag in args:
            i = args.index(flag)
            j = next((k for k in range(i + 1, len(args)) if args[k].startswith("--")), len(args))
            del args[i:j]
    with pytest.raises(CloError, match=message.replace("(", r"\(")) as e:
        study.main([*args, *extra])
    assert "\n" not in str(e.value)
    assert not (out / "cells").exists()


def test_a_rerun_with_other_settings_is_refused(finished, tiny):
    with pytest.raises(CloError, match="holds a study with seed 0, not 1; choose another --out"):
        study.main(argv(tiny, finished, "--seed", "1"))


def test_judge_gives_each_method_a_win_rate_against_sft_of_its_size(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "run"
    study.main([*argv(tiny, out)[: argv(tiny, out).index("--lrs")], "--lrs", "1e-3", "--dev", "0", "--batch-size", "4", "--max-new-tokens", "8",
                "--eval-limit", "2", "--device", "cpu", "--out", str(out), "--judge", str(folder)])
    cells = {(r["method"], r["size"]): r["metrics"]["win_rate"] for r in rows(out) if r["kind"] == "cell"}
    assert all(cells["clo", n] is not None for n in SIZES) and all(cells["sft", n] is None for n in SIZES)
    for n in SIZES:
        judged = json.loads((out / "eval" / f"n{n}" / "metrics.json").read_text())["models"]
        assert [m["name"] for m in judged] == ["sft", "clo"] and judged[1]["judge"]["against"] == "sft"
        assert judged[1]["judge"]["win_rate"] == cells["clo", n]
    assert "## win rate against SFT of the same size" in (out / "study.md").read_text()
    assert not [r for r in rows(out) if r["kind"] == "sweep"]  # one learning rate: no sweep


def test_a_rate_whose_dev_answers_break_is_not_chosen(tiny, tmp_path, monkeypatch, finished):
    """The sweep's guard: the rate with the lowest dev NLL is ruled out once its dev answers to English
    prompts are in English less than half as often as the base model's (here 25% vs 100%, set in the
    eval files the study reads); with every rate broken the study stops with one line."""
    import eval as evaluate

    sweep = [r for r in rows(finished) if r["kind"] == "sweep" and r["method"] == "clo"]
    best, other = sorted(sweep, key=lambda r: r["dev_score"])
    real_eval = evaluate.main
    en_rates = {"dev-base": 1.0, f"dev-{Path(best['cell']).name}": 0.25, f"dev-{Path(other['cell']).name}": 1.0}

    def rewritten(args):
        real_eval(args)
        folder = Path(args[args.index("--out") + 1])
        if folder.name in en_rates:
            path = folder / "metrics.jsonl"
            results = [json.loads(line) for line in path.read_text().splitlines()]
            for r in results:
                r["fidelity"]["en"]["in_lang_rate"] = en_rates[folder.name]
            path.write_text("".join(json.dumps(r) + "\n" for r in results))

    monkeypatch.setattr(evaluate, "main", rewritten)
    out = tmp_path / "run"
    study.main(argv(tiny, out, "--methods", "clo", "--sizes", str(max(SIZES))))  # the sweep's size only: its runs are the cells
    got = {r["lr"]: r for r in rows(out) if r["kind"] == "sweep"}
    assert got[best["lr"]]["broken"] == "en prompts answered in en 25% vs the base model's 100%" and not got[best["lr"]]["chosen"]
    assert got[other["lr"]]["chosen"] and {r["lr"] for r in rows(out) if r["kind"] == "cell"} == {other["lr"]}
    assert "broken" in tables((out / "study.md").read_text())["Learning rates"]["clo"][LRS.index(best["lr"])]

    # the other rate broken too (its dev eval's file rewritten; the rerun reads it from disk): one line, nothing written
    path = out / "eval" / f"dev-{Path(other['cell']).name}" / "metrics.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines()]
    for r in results:
        r["fidelity"]["en"]["in_lang_rate"] = 0.0
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    before = (out / "study.md").read_text()
    with pytest.raises(CloError, match="every learning rate diverged or broke clo's dev answers"):
        study.main(argv(tiny, out, "--methods", "clo", "--sizes", str(max(SIZES))))
    assert (out / "study.md").read_text() == before


def test_a_rate_whose_dev_nll_is_null_is_not_chosen(tiny, tmp_path, monkeypatch, finished):
    """eval.py writes a diverged model's NLL as null (standard JSON has no NaN): the sweep reads that rate's
    score as not finite and chooses another, instead of failing on the null."""
    import eval as evaluate

    sweep = [r for r in rows(finished) if r["kind"] == "sweep" and r["method"] == "clo"]
    best, other = sorted(sweep, key=lambda r: r["dev_score"])
    real_eval = evaluate.main

    def diverged(args):
        real_eval(args)
        path = Path(args[args.index("--out") + 1]) / "metrics.jsonl"
        if path.parent.name == f"dev-{Path(best['cell']).name}":
            results = [json.loads(line) for line in path.read_text().splitlines()]
            for r in results:
                r["preference"]["nll_t"] = None
            path.write_text("".join(json.dumps(r) + "\n" for r in results))

    monkeypatch.setattr(evaluate, "main", diverged)
    out = tmp_path / "run"
    study.main(argv(tiny, out, "--methods", "clo", "--sizes", str(max(SIZES))))
    got = {r["lr"]: r for r in rows(out) if r["kind"] == "sweep"}
    assert got[best["lr"]]["dev_score"] is None and not got[best["lr"]]["chosen"] and got[other["lr"]]["chosen"]


def test_held_out_pairs_that_share_a_prompt_with_the_training_pool_are_refused(tiny, tmp_path):
    line = tiny[1].read_text(encoding="utf-8").splitlines()[5]  # one pair of the pool, held out too
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(demo_path("sw", heldout=True).read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    with pytest.raises(CloError, match=r"--heldout .*heldout.jsonl: 1 of its \d+ pairs have a prompt of --pairs"):
        study.main([*argv(tiny, tmp_path / "run"), "--heldout", str(heldout)])
