"""The report (clo/eval/report.py): table cells from known numbers, atomic writes, the plot."""


from pathlib import Path

import pytest

from clo.atomic import write_atomic
from clo.eval.report import markdown_report, plot_main_numbers

FIDELITY = {
    "sw": {"n": 4, "in_lang": 3, "in_lang_rate": 0.75, "n_ok": 2, "in_lang_ok": 1, "in_lang_rate_ok": 0.5, "degenerate": 2,
           "degenerate_rate": 0.5, "degenerate_by_reason": {"copy": 2}, "hit_max_new_tokens": 1, "answer_langs": {"sw": 3, "en": 1}},
    "en": {"n": 4, "in_lang": 4, "in_lang_rate": 1.0, "n_ok": 4, "in_lang_ok": 4, "in_lang_rate_ok": 1.0, "degenerate": 0,
           "degenerate_rate": 0.0, "degenerate_by_reason": {}, "hit_max_new_tokens": 0, "answer_langs": {"en": 4}},
}  # fmt: skip
PREFERENCE = {"pref_t": 0.25, "margin_t": -3.5, "pref_en": 1.0, "margin_en": 12.25, "nll_t": 2.5, "nll_en": 1.25}
MC = {"n": 10, "accuracy": 0.3, "macro_accuracy": 0.35, "subjects": {"anatomy": {"n": 4, "accuracy": 0.5}, "law": {"n": 6, "accuracy": 1 / 6}}}


def results():
    base = {"name": "base", "fidelity": FIDELITY, "preference": PREFERENCE, "mc": MC, "judge": None}
    clo = {**base, "name": "clo", "judge": {"against": "base", "win_rate": 0.625}}
    return [base, clo]


def test_markdown_cells():
    report = markdown_report(results(), "sw", {"limit": 4})
    assert (
        "| base | 75.0% (3/4) | 50.0% (1/2) | 50.0% (2/4) | 100.0% (4/4) | 100.0% (4/4) | 0.0% (0/4) "
        "| 25.0% | -3.50 | 100.0% | 12.25 | 2.500 | 1.250 | 30.0% (3/10) | – |"
    ) in report
    assert report.count("| clo |") == 4  # main table, two answer-language rows, MC table
    assert "| 62.5% vs base |" in report
    assert "| clo | sw | 1 | 3 | 4 | 0 / 2 / 0 | 1 |" in report  # answer langs en, sw; empty/copy/repeat
    assert "| base | 50.0% | 16.7% | 30.0% | 35.0% |" in report  # per-subject accuracy


def test_write_atomic_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    write_atomic(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_folder_replaced_while_a_kill_lands_is_old_or_new_never_half(tmp_path, monkeypatch):
    """atomic_folder replacing a model folder: a kill while the old one is deleted (here: after its first file)
    leaves the new folder whole; a failed final rename puts the old one back."""
    import os
    import shutil

    from clo.atomic import atomic_folder

    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        for name in ("a.safetensors", "config.json", "z.json"):
            (tmp / name).write_text("old")
    real_rmtree, calls = shutil.rmtree, []

    def killed_midway(path, *a, **k):  # the first deletion is killed after one file; any later one runs
        calls.append(path)
        if len(calls) > 1:
            return real_rmtree(path, *a, **k)
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            for name in ("a.safetensors", "config.json", "z.json"):
                (tmp / name).write_text("new")
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.safetensors": "new", "config.json": "new", "z.json": "new"}

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk")) if Path(b) == out and ".old-" not in str(a) else real_replace(a, b))
    with pytest.raises(OSError):
        with atomic_folder(out) as tmp:
            (tmp / "config.json").write_text("newer")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.safetensors": "new", "config.json": "new", "z.json": "new"}


def test_plot_is_a_png_of_the_figure_size(tmp_path):
    import struct

    plot_main_numbers(results(), "sw", tmp_path / "report.png")
    data = (tmp_path / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert height == 4 * 120 and width >= 6 * 120  # figsize (>= 6, 4) inches at 120 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left
