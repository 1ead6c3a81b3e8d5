"""eval.py end to end on tiny chat models, its prompt files, its outputs, and its errors on bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_chat_model import make_tiny_chat_model

import eval as eval_script
from clo.errors import CloError
from clo.eval.generation import fidelity, generate_answers
from clo.eval.prompts import load_prompts
from clo.eval.report import main_table
from clo.model.chat import detect_format, encode_prompt, stop_ids
from clo.model.generate import generate
from clo.model.hf_folder import load_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs

REPO = Path(__file__).resolve().parents[1]
MC_ROWS = [
    ("Habari ni nini?", "a", "b", "c", "d", "A"),
    ("Which one is blue?", "sky", "grass", "coal", "snow", "A"),
    ("Two plus two?", "three", "four", "five", "six", "B"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny ChatML 'checkpoints' (different seeds) whose tokenizer was trained on the Swahili demo set."""
    examples = load_pairs(demo_path("sw")).examples
    texts = [t for ex in examples for t in (ex.prompt_en, ex.response_en, ex.prompt, ex.response)]
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_chat_model(root / "base", texts), make_tiny_chat_model(root / "clo-sw" / "model", texts, seed=1)


def write_csv(path, rows):
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


# --- prompt files ---------------------------------------------------------------------------------


def test_alpaca_eval_json_and_jsonl(tmp_path):
    records = [{"instruction": "Say hi.", "output": "hi", "dataset": "x"}, {"instruction": "Jibu swali.", "lang": "sw", "id": "q2"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("a.json", "b.jsonl"):
        prompts = load_prompts(tmp_path / name)
        assert [(p.set, p.id, p.lang, p.text) for p in prompts] == [
            (name.split(".")[0], "1", "en", "Say hi."),
            (name.split(".")[0], "q2", "sw", "Jibu swali."),
        ]
    assert len(load_prompts(tmp_path / "a.json", limit=1)) == 1


def test_real_alpaca_eval_file(shared_data):
    prompts = load_prompts(shared_data / "alpaca" / "alpaca_eval_805.jsonl")
    assert len(prompts) == 805 and {p.lang for p in prompts} == {"en"}


def test_cross_lingual_file_gives_both_prompts():
    prompts = load_prompts(demo_path("sw", heldout=True), limit=3)
    examples = load_pairs(demo_path("sw", heldout=True)).examples[:3]
    assert [(p.lang, p.text) for p in prompts] == [("sw", ex.prompt) for ex in examples] + [("en", ex.prompt_en) for ex in examples]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "ok"}\n{"instruction": ""}\n', r"p.jsonl:2: field 'instruction' is missing or empty"),
        ('{"instruction": "ok"}\n{"instruction": \n', r"p.jsonl:2: invalid JSON"),
        ('{"instruction": "ok", "lang": "xx"}\n', r"p.jsonl:1: field 'lang' is 'xx'"),
        ('{"instruction": "a", "id": 7}\n{"instruction": "b", "id": "7"}\n', r"p.jsonl:2: duplicate id '7'"),
        ("", r"p.jsonl: no records"),
    ],
)
def test_bad_prompt_file(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(CloError, match=message):
        load_prompts(tmp_path / "p.jsonl")


# --- generation and fidelity ----------------------------------------------------------------------


def test_batched_answers_equal_one_by_one(tiny):
    """Length-sorted batches give each prompt the answer it gets alone, in the original order."""
    folder = tiny[0]
    tok, model = load_tokenizer(folder), load_model(folder)
    fmt = detect_format(tok)
    prompts = load_prompts(demo_path("sw", heldout=True), limit=3)
    batched = generate_answers(model, tok, fmt, prompts, max_new_tokens=6, batch_size=4)
    for p, (text, n) in zip(prompts, batched):
        alone = generate(model, [encode_prompt(tok, fmt, p.text)], 6, stop_ids(tok, fmt), tok.pad_id)[0]
        assert (text, n) == (tok.decode(alone), len(alone))


@pytest.mark.slow
def test_compiled_answers_equal_eager(tiny):
    """eval.py --compile: the compiled decode answers as the eager one, over batches of two shapes
    (2 prompts, then the last 1), and frees its kept KV cache at the end."""
    folder = tiny[0]
    tok, model = load_tokenizer(folder), load_model(folder)
    fmt = detect_format(tok)
    prompts = load_prompts(demo_path("sw", heldout=True), limit=3)
    eager = generate_answers(model, tok, fmt, prompts, max_new_tokens=6, batch_size=2)
    assert generate_answers(model, tok, fmt, prompts, max_new_tokens=6, batch_size=2, compile=True) == eager
    assert all(layer.self_attn.kv_cache is None for layer in model.layers)


def test_fidelity_by_hand():
    def rec(prompt_lang, answer_lang, degenerate=None):
        return {"prompt_lang": prompt_lang, "answer_lang": answer_lang, "degenerate": degenerate, "hit_max_new_tokens": False}

    records = [rec("sw", "sw"), rec("sw", "sw", "copy"), rec("sw", "en"), rec("sw", "und", "empty"), rec("en", "en"), rec("en", "sw")]
    f = fidelity(records)
    assert f["sw"]["n"] == 4 and f["sw"]["in_lang_rate"] == 0.5  # 2 of 4 (the copy counts as Swahili)
    assert f["sw"]["n_ok"] == 2 and f["sw"]["in_lang_rate_ok"] == 0.5  # of the 2 usable answers, 1 is Swahili
    assert f["sw"]["degenerate_rate"] == 0.5 and f["sw"]["degenerate_by_reason"] == {"copy": 1, "empty": 1}
    assert f["sw"]["answer_langs"] == {"sw": 2, "en": 1, "und": 1}
    assert f["en"]["in_lang"] == 1 and f["en"]["in_lang_rate"] == 0.5
    table = main_table([{"name": "m", "fidelity": f}], "sw")
    assert "| m | 50.0% (2/4) | 50.0% (1/2) | 50.0% (2/4) | 50.0% (1/2) |" in table


# --- eval.py end to end ---------------------------------------------------------------------------


def test_full_run_on_tiny_models(tiny, tmp_path):
    base, clo = tiny
    csv = write_csv(tmp_path / "misc_test.csv", MC_ROWS)
    out = tmp_path / "eval"
    argv = ["--lang", "sw", "--models", str(base), str(clo), "--limit", "3", "--max-new-tokens", "5", "--batch-size", "4"]
    results = eval_script.main([*argv, "--mmlu", str(csv), "--judge", str(base), "--out", str(out)])

    names = [r["name"] for r in results]
    assert names == ["base", "clo-sw"]  # runs/X/model is named X
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 * 6  # 3 held-out pairs -> 3 Swahili + 3 English prompts, per model
    for result in results:
        rows = [g for g in generations if g["model"] == result["name"]]
        assert result["fidelity"] == json.loads(json.dumps(fidelity(rows)))  # the metrics are those of the JSONL
        assert result["preference"]["n"] == 3 and result["mc"]["n"] == 3
    assert results[0]["judge"] is None and results[1]["judge"]["against"] == "base"
    assert results[1]["judge"]["n_judgments"] == 12
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lang"] == "sw" and [m["name"] for m in metrics["models"]] == names
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    for name in names:
        exported = json.loads((out / "alpaca_eval" / f"{name}.json").read_text())
        assert len(exported) == 6 and set(exported[0]) >= {"instruction", "output", "generator"}
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| clo-sw |" in report and "sw prompts: in sw" in report
    assert not [p for p in out.rglob(".*")]  # no temp files left behind


def test_a_rerun_replaces_every_file_and_a_diverged_model_writes_standard_json(tiny, tmp_path):
    """A second run into the same --out leaves no file of the first that no longer matches its metrics (judgments
    without --judge, another model's AlpacaEval export); a model with NaN weights gets null numbers, not NaN
    (which JSON lacks) and not a made-up 0% preference."""
    from safetensors.torch import load_file, save_file

    base, clo = tiny
    out = tmp_path / "eval"
    common = ["--lang", "sw", "--limit", "2", "--max-new-tokens", "3", "--out", str(out)]
    eval_script.main([*common, "--models", str(base), str(clo), "--names", "old-a", "old-b", "--judge", str(base)])
    assert (out / "judgments.jsonl").is_file()
    diverged = tmp_path / "diverged"
    shutil.copytree(base, diverged)
    weights = load_file(diverged / "model.safetensors")
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, diverged / "model.safetensors", metadata={"format": "pt"})
    eval_script.main([*common, "--models", str(diverged), "--names", "new"])
    assert not (out / "judgments.jsonl").exists() and [p.name for p in (out / "alpaca_eval").iterdir()] == ["new.json"]

    def strict(text):  # json.loads accepts NaN and Infinity; standard JSON (jq, JavaScript) does not
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    metrics = strict((out / "metrics.json").read_text())["models"][0]
    for name in ("metrics.jsonl", "heldout.jsonl", "generations.jsonl"):
        [strict(line) for line in (out / name).read_text().splitlines()]
    assert metrics["preference"]["pref_t"] is None and metrics["preference"]["nll_t"] is None


def test_a_link_inside_out_is_refused_and_its_target_left_alone(tiny, tmp_path):
    """eval.py replaces and removes files in --out/alpaca_eval: a planted link there would reach another folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.json").write_text("{}")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "alpaca_eval").symlink_to(elsewhere)
    with pytest.raises(CloError, match="alpaca_eval is a link"):
        eval_script.main(["--lang", "sw", "--models", str(tiny[0]), "--limit", "1", "--max-new-tokens", "2", "--out", str(out)])
    assert [p.name for p in elsewhere.iterdir()] == ["precious.json"]


def test_prompt_files_and_names(tiny, tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Name a colour."}, {"instruction": "Taja rangi.", "lang": "sw"}]))
    out = tmp_path / "eval"
    results = eval_script.main([
        "--lang", "sw", "--models", str(tiny[0]), "--names", "tiny", "--prompts", str(tmp_path / "alpaca.json"),
        "--limit", "2", "--max-new-tokens", "3", "--out", str(out),
    ])  # fmt: skip
    assert results[0]["name"] == "tiny" and set(results[0]["fidelity"]) == {"en", "sw"}
    assert set(results[0]["fidelity_by_set"]) == {"alpaca"}
    assert results[0]["preference"]["n"] == 2  # the held-out set is still scored


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda d: ["--prompts", str(d / "missing.jsonl")], r"missing.jsonl: no such file"),
        (lambda d: ["--mmlu", str(write_csv(d / "bad_test.csv", [MC_ROWS[0], ("q", "a", "b")]))], r"bad_test.csv:2: expected 6 columns"),
        (lambda d: ["--heldout", str(d / "none.jsonl")], r"none.jsonl: no such file"),
        (lambda d: ["--models", str(d / "nowhere")], r"nowhere.* neither a local folder"),
        (lambda d: ["--judge", str(d / "nowhere")], r"--judge: needs at least two --models"),
        (lambda d: ["--names", "just-one", "and-two"], r"--names: 2 names for 1 models"),
        (lambda d: ["--lang", "en"], r"must not be English"),
        (lambda d: ["--langs", "en", "qq"], r"no model for 'qq'"),
        (lambda d: ["--langs", "en", "de"], r"--langs en de: must include sw"),
        (lambda d: ["--langs", "sw", "de"], r"--langs sw de: must include en"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, make_bad, message):
    out = tmp_path / "eval"
    with pytest.raises(CloError, match=message):
        eval_script.main(["--lang", "sw", "--models", str(tiny[0]), "--max-new-tokens", "2", "--out", str(out), *make_bad(tmp_path)])
    assert not out.exists()


@pytest.mark.parametrize("damage", ["no_config", "garbage_weights", "wrong_architecture", "no_weights"])
def test_checkpoint_that_does_not_load(tiny, tmp_path, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny[0], broken)
    if damage == "no_config":
        (broken / "config.json").unlink()
    elif damage == "garbage_weights":
        (broken / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    elif damage == "wrong_architecture":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    else:
        (broken / "model.safetensors").unlink()
    out = tmp_path / "eval"
    with pytest.raises(CloError) as e:
        eval_script.main(["--lang", "sw", "--models", str(tiny[0]), str(broken), "--out", str(out)])
    assert "broken" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()  # checked before the first model runs


@pytest.mark.slow
def test_default_model_and_two_demo_checkpoints(smollm2_dir, tiny, tmp_path):
    """The issue's CI run: the real default model and two tiny checkpoints, small sizes, as a subprocess."""
    csv = write_csv(tmp_path / "misc_test.csv", MC_ROWS)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable, "eval.py", "--lang", "sw", "--models", str(smollm2_dir), str(tiny[0]), str(tiny[1]),
            "--limit", "4", "--max-new-tokens", "16", "--mmlu", str(csv), "--judge", str(smollm2_dir), "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in metrics["models"]] == ["smollm2-135m-instruct", "base", "clo-sw"]
    smol = metrics["models"][0]
    assert smol["fidelity"]["en"]["n"] == 4 and smol["fidelity"]["sw"]["n"] == 4
    # SmolLM2 is an English model: it keeps English on English prompts
    assert smol["fidelity"]["en"]["in_lang_rate"] >= 0.75
    # and prefers the reference answer in the prompt's language for English prompts
    assert smol["preference"]["pref_en"] >= 0.75
    assert all(m["judge"]["n_judgments"] == 16 for m in metrics["models"][1:])
    assert (out / "report.md").is_file() and len((out / "generations.jsonl").read_text().splitlines()) == 3 * 8


def test_no_generate_refuses_prompts_and_judge_before_any_model():
    for extra in (["--prompts", "x.jsonl"], ["--judge", "j", "--models", "a", "b"]):
        with pytest.raises(CloError, match="--no-generate: answers no prompts"):
            eval_script.main(["--lang", "sw", "--no-generate", *extra])
