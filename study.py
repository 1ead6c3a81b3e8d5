"""Does CLO deliver? The paper's comparison as one command: methods x data sizes, trained and evaluated alike.

    python study.py --lang sw                       # clo vs sft on the Swahili demo set, the default model
    # human-translated news (translate.py parallel), the paper's sizes and baselines, a 7B model on a GPU
    python study.py --lang sw --model meta-llama/Llama-2-7b-chat-hf --pairs sw_mafand_train.jsonl \\
        --heldout sw_mafand_test.jsonl --sizes 200 400 800 1600 3200 6400 --methods clo sft sft-dpo --lrs 8e-6

Reads top to bottom (each step's files are kept in --out, so a rerun of the same command continues):
  0. every argument and input is checked before any training; the pairs are shuffled once (--seed):
     the first --dev pairs are the dev split, the rest the training pool, and a size N trains on the
     pool's first N pairs, so a larger size holds every smaller one;
  1. the learning rate of each method: with several --lrs, each is trained at --sweep-size (default:
     the largest size, where drift is largest) and evaluated on the dev split (never on --heldout);
     a rate whose dev answers break (`broken`: English prompts answered in English, or target prompts
     in the target language, less than half as often as by the base model) is out, and of the rest
     the lowest dev NLL wins (the mean of the target and English per-token NLL of the dev reference
     answers: learning the target language without forgetting English);
  2. every cell (method, size) trained with train.py at its method's learning rate, same seed;
  3. the base model and every size's cells evaluated with eval.py on the same held-out pairs and
     prompts (with --judge: every method against the SFT cell of its size, both orders);
  4. the comparison, written into --out:

    study.md        one table per metric (rows methods, columns sizes; size 0 is the base model),
                    each number with its 95% bootstrap interval over the held-out sample; then each
                    method minus SFT at the same size, paired on the same pairs and prompts, with the
                    95% interval of the difference (clo/eval/paired.py): the test two overlapping
                    intervals are not
    study.jsonl     every number of every cell, the base model, the sweep and the differences, one JSON line each
    study.png       each metric against data size, one line per method (its 95% bootstrap interval as a
                    band), the base model as a dashed line
    cells/<method>-n<size>-lr<lr>/   train.py's run (model/, metrics.jsonl, run.json)
    eval/base/, eval/n<size>/         eval.py's outputs (metrics.jsonl, generations.jsonl, report.md)
    data/pool.jsonl, data/dev.jsonl   the shuffled training pool and the dev split

Resumable: a cell whose model was saved is never trained again, an interrupted one resumes from
its checkpoint, a size already evaluated with the same models is not evaluated again. Settings
that change the numbers (study.json) must match on a rerun; --sizes, --methods, --lrs, --sweep-size
and --judge may change (a new learning rate is one more sweep run; a finished cell is kept).
Limitations: one process (run train.py / eval.py under torchrun yourself for several GPUs); full
attention training only (no --lora); the learning rate is chosen at one size for every size
(as in the paper, one recipe for every size).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
from pathlib import Path

import eval as evaluate
import train
from clo.atomic import atomic_file, write_atomic
from clo.errors import ArgumentParser, CloError, run_cli
from clo.eval.paired import answer_differences, heldout_differences
from clo.eval.prompts import load_prompts
from clo.jsonl import dumps_line
from clo.languages import target_language
from clo.lock import output_lock
from clo.model.sources import DEFAULT_MODEL, cache_dir, resolve_model
from clo.pairs import demo_path, load_pairs, pair_line
from clo.train.reference import model_fingerprint
from clo.train.schedule import PAPER_LR
from clo.train.stages import parse_stages

METHODS = ("clo", "sft", "sft-dpo", "dpo")
# The learning rates a sweep tries when --lrs is not given: around what trains the default model
# (135M parameters, attention only, tens of steps); any other model gets the paper's 7B recipe alone.
DEFAULT_MODEL_LRS = (3e-5, 1e-4, 3e-4, 1e-3)

# (key, label, what it is, which way is better); every cell's numbers, from eval.py's metrics.
METRICS = (
    ("in_t", "{t} prompts answered in {t}", "share of all answers", "higher"),
    ("in_t_ok", "{t} prompts answered in {t}, non-degenerate answers", "share of the answers that are not degenerate", "higher"),
    ("degenerate_t", "degenerate answers to {t} prompts", "empty, copying the prompt, or looping", "lower"),
    ("en_in_en", "en prompts answered in en", "share of all answers", "higher"),
    ("nll_t", "NLL of held-out {t} answers", "per token, given the {t} prompt", "lower"),
    ("nll_en", "NLL of held-out en answers", "per token, given the en prompt", "lower"),
    ("pref_t", "held-out pairs preferring y_{t} given x_{t}", "share with log π(y_t|x_t) > log π(y_en|x_t), sequence log-probs", "higher"),
    ("pref_t_per_token", "held-out pairs preferring y_{t} given x_{t}, per token", "the same on per-token mean log-probs (length-fair: y_t is often longer in tokens)", "higher"),
    ("margin_t", "margin given x_{t}", "mean of log π(y_t|x_t) − log π(y_en|x_t), nats", "higher"),
    ("pref_en", "held-out pairs preferring y_en given x_en", "share with log π(y_en|x_en) > log π(y_t|x_en)", "higher"),
    ("margin_en", "margin given x_en", "mean of log π(y_en|x_en) − log π(y_t|x_en), nats", "higher"),
    ("win_rate", "win rate against SFT of the same size", "judged, both presentation orders, ties count ½", "higher"),
)
RATES = {"in_t", "in_t_ok", "degenerate_t", "en_in_en", "pref_t", "pref_t_per_token", "pref_en", "win_rate"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lang", required=True, help="target language: sw, yo, id, ko, zh or de")
    p.add_argument("--model", default=DEFAULT_MODEL, help="starting checkpoint of every cell (an HF folder, a hub id, or the default)")
    p.add_argument("--pairs", help="cross-lingual JSONL to train on (translate.py writes it); default: the demo set data/demo/<lang>.jsonl")
    p.add_argument("--heldout", help="cross-lingual JSONL of test pairs, never trained or tuned on; default: data/demo/<lang>.heldout.jsonl")
    p.add_argument("--prompts", nargs="+", help="prompt files every model answers (eval.py --prompts); default: the --heldout file")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 96], help="numbers of training pairs, each a cell per method")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["clo", "sft"], help="train.py --method of each row")
    p.add_argument("--lrs", nargs="+", type=float, help="learning rates to sweep on the dev split, per method "
                   f"(default: {' '.join(map(str, DEFAULT_MODEL_LRS))} for the default model, else the paper's {PAPER_LR} alone)")
    p.add_argument("--sweep-size", type=int, default=0, help="training pairs of the sweep's runs (0: the largest of --sizes: "
                   "the most steps, where a rate that is too high does its harm; that size's cells are the sweep's own runs)")
    p.add_argument("--dev", type=int, default=16, help="pairs held back from --pairs as the dev split of the sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of every run")
    p.add_argument("--stages", default="attn:2", help="train.py --stages of every cell (paper: attention only, 2 epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="train.py --batch-size")
    p.add_argument("--max-length", type=int, default=512, help="train.py --max-length")
    p.add_argument("--max-new-tokens", type=int, default=128, help="eval.py --max-new-tokens: longest answer")
    p.add_argument("--eval-limit", type=int, default=0, help="eval.py --limit: the first N held-out pairs and prompts of each file (0: all)")
    p.add_argument("--judge", help="a local instruct checkpoint: every method judged against the SFT cell of its size (needs sft in --methods)")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda if available)")
    p.add_argument("--out", help="output folder (default: runs/study-<lang>)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Flags alone, before anything is read: one line naming the flag."""
    target_language(args.lang)
    parse_stages(args.stages)
    if any(n < 1 for n in args.sizes):
        raise CloError(f"--sizes {' '.join(map(str, args.sizes))}: every size must be at least 1")
    args.sizes = sorted(set(args.sizes))
    if len(set(args.methods)) != len(args.methods):
        raise CloError(f"--methods {' '.join(args.methods)}: a method is named twice")
    if args.lrs is not None:
        if any(not (math.isfinite(lr) and lr > 0) for lr in args.lrs):
            raise CloError(f"--lrs {' '.join(map(str, args.lrs))}: every learning rate must be a positive number")
        args.lrs = sorted(set(args.lrs))
    if args.sweep_size < 0:
        raise CloError(f"--sweep-size {args.sweep_size}: must be 0 (the largest of --sizes) or more")
    for flag in ("dev", "eval_limit"):
        if getattr(args, flag) < 0:
            raise CloError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be 0 or more")
    for flag in ("batch_size", "max_length", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise CloError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.judge and "sft" not in args.methods:
        raise CloError("--judge: win rates are against the SFT cell of each size; add sft to --methods")


def main(argv=None) -> Path:
    args = parse_args(argv)
    lang = target_language(args.lang).code
    out = Path(args.out or f"runs/study-{lang}")

    # 0. Inputs, checked before any training; the shuffled split, written once.
    pairs_path = Path(args.pairs) if args.pairs else demo_path(lang)
    heldout_path = Path(args.heldout) if args.heldout else demo_path(lang, heldout=True)
    pairs = load_pairs(pairs_path, lang).examples
    heldout = load_pairs(heldout_path, lang).examples
    trained_prompts = {ex.prompt_en for ex in pairs} | {ex.prompt for ex in pairs}
    seen = [ex.id for ex in heldout if ex.prompt_en in trained_prompts or ex.prompt in trained_prompts]
    if seen:  # "held out" means never trained or tuned on
        raise CloError(f"--heldout {heldout_path}: {len(seen)} of its {len(heldout)} pairs have a prompt of --pairs {pairs_path} (first: {seen[0]!r})")
    for prompts in args.prompts or []:
        load_prompts(Path(prompts), "en", 0)
    if args.judge and not (Path(args.judge) / "config.json").is_file():
        raise CloError(f"--judge {args.judge}: not a checkpoint folder (no config.json)")
    lrs = args.lrs or (list(DEFAULT_MODEL_LRS) if args.model == DEFAULT_MODEL else [PAPER_LR])
    if len(lrs) > 1 and args.dev < 1:
        raise CloError(f"--dev 0: a sweep of {len(lrs)} learning rates needs dev pairs")
    pool_size = len(pairs) - args.dev  # held back even without a sweep, so a later sweep finds the same pool
    sweep_size = args.sweep_size or max(args.sizes)
    too_big = [n for n in [*args.sizes, sweep_size] if n > pool_size]
    if too_big:
        raise CloError(f"--sizes/--sweep-size {max(too_big)}: {pairs_path} has {len(pairs)} pairs, {pool_size} to train on after the dev split")
    model = str(resolve_model(args.model))  # fetches and converts the default model once
    # What every cell and evaluation computes; --sizes, --methods, --lrs, --sweep-size and --judge may
    # change on a rerun (cells are named by method, size and learning rate; an evaluation reruns when
    # its arguments change).
    settings = {
        "lang": lang, "model": model_fingerprint(Path(model), memo=cache_dir() / "fingerprints.json"), "pairs": digest(pairs_path), "heldout": digest(heldout_path),
        "prompts": [digest(Path(p)) for p in args.prompts or []], "dev": args.dev, "seed": args.seed,
        "stages": args.stages, "batch_size": args.batch_size, "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens, "eval_limit": args.eval_limit, "device": args.device,
    }  # fmt: skip
    with output_lock(out):  # one study per --out
        check_settings(out / "study.json", settings)
        pool_path, dev_path = write_split(out / "data", pairs, settings["dev"], args.seed)
        study = Study(args, lang, model, out, pool_path, heldout_path)

        # 1. A learning rate per method, chosen on the dev split.
        chosen, sweep = {}, []
        for method in args.methods:
            chosen[method], rows = study.choose_lr(method, lrs, sweep_size, dev_path)
            sweep += rows

        # 2. Every cell trained, smaller sizes first (a first look at the trend comes early).
        cells = {(m, n): study.train_cell(m, n, chosen[m]) for n in args.sizes for m in args.methods}

        # 3. Every model evaluated on the same held-out pairs and prompts.
        base = study.evaluate("base", [("base", model)])["base"]
        results = {}
        for n in args.sizes:
            ordered = sorted(args.methods, key=lambda m: m != "sft")  # the judge's baseline first
            got = study.evaluate(f"n{n}", [(m, str(cells[m, n] / "model")) for m in ordered])
            results |= {(m, n): got[m] for m in ordered}

        # 4. The comparison.
        rows = [{"kind": "base", "method": "base", "size": 0, "lr": None, "eval": str(out / "eval" / "base"), "metrics": cell_metrics(base, lang),
                 "ci95": cell_intervals(base, lang)}]
        for (m, n), result in results.items():
            rows.append({"kind": "cell", "method": m, "size": n, "lr": chosen[m], "cell": str(cells[m, n]),
                         "eval": str(out / "eval" / f"n{n}"), "train": run_summary(cells[m, n]), "metrics": cell_metrics(result, lang),
                         "ci95": cell_intervals(result, lang)})
        if "sft" in args.methods:  # every other method against SFT on the same pairs and prompts
            rows += [{"kind": "difference", "method": m, "against": "sft", "size": n, "lr": chosen[m], "eval": str(out / "eval" / f"n{n}"),
                      **differences(out / "eval" / f"n{n}", m, "sft", lang)} for n in args.sizes for m in args.methods if m != "sft"]
        rows += sweep
        write_atomic(out / "study.jsonl", "".join(dumps_line(r) for r in rows))
        write_atomic(out / "study.md", markdown(rows, args, lang, {**settings, "lrs": lrs, "sweep_size": sweep_size, "judge": args.judge}, pairs_path, heldout_path))
        plot(rows, args.methods, lang, out / "study.png")
    print(f"study: wrote {out}/study.md, study.jsonl and study.png", file=sys.stderr)
    return out


class Study:
    """Runs train.py and eval.py for the cells, skipping what an earlier run of the study finished."""

    def __init__(self, args, lang: str, model: str, out: Path, pool: Path, heldout: Path):
        self.args, self.lang, self.model, self.out, self.pool, self.heldout = args, lang, model, out, pool, heldout

    def train_cell(self, method: str, size: int, lr: float) -> Path:
        """One train.py run: the pool's first `size` pairs. -> its folder (holding model/)."""
        cell = self.out / "cells" / f"{method}-n{size}-lr{lr:g}"
        if (cell / "model" / "config.json").is_file():
            note(f"{cell.name}: trained already")
            return cell
        a = self.args
        # no preview (--show-answers 0): eval.py measures every cell; the preview would generate 8 more answers per cell
        argv = ["--lang", self.lang, "--model", self.model, "--data", str(self.pool), "--max-examples", str(size),
                "--method", method, "--lr", repr(lr), "--seed", str(a.seed), "--stages", a.stages, "--batch-size", str(a.batch_size),
                "--max-length", str(a.max_length), "--device", a.device, "--out", str(cell), "--show-answers", "0"]  # fmt: skip
        if method == "sft-dpo":
            argv.append("--resume")  # its phases resume or start as their files say (train.py sft_then_dpo)
        elif (cell / "checkpoint.pt").is_file():
            argv.append("--resume")
        elif cell.exists():
            argv.append("--overwrite")  # this study's own run, killed before its first checkpoint
        note(f"{cell.name}: training")
        try:
            train.main(argv)
        except SystemExit as stop:  # Ctrl-C / SIGTERM: train.py saved a checkpoint
            print("study: interrupted; run the same command again to continue", file=sys.stderr)
            raise stop
        return cell

    def evaluate(self, name: str, models: list[tuple[str, str]], dev: Path | None = None) -> dict[str, dict]:
        """eval.py on `models` [(name, folder)] into eval/<name>, unless it ran with the same arguments. -> results by name.
        dev: the dev split instead of the held-out pairs and prompts (its own prompts answered, no judge)."""
        a, folder = self.args, self.out / "eval" / name
        argv = ["--lang", self.lang, "--models", *(f for _, f in models), "--names", *(n for n, _ in models),
                "--heldout", str(dev or self.heldout), "--max-new-tokens", str(a.max_new_tokens), "--device", a.device, "--out", str(folder)]  # fmt: skip
        argv += ["--prompts", *a.prompts] if a.prompts and not dev else []
        argv += ["--limit", str(a.eval_limit)] if a.eval_limit else []
        argv += ["--judge", a.judge] if a.judge and not dev and len(models) > 1 else []
        done = folder.parent / f"{folder.name}.argv.json"  # beside the folder: eval.py's --out holds only its own files
        needed = ["metrics.jsonl"] + ([] if dev else ["heldout.jsonl", "generations.jsonl"])  # what the paired differences read
        if done.is_file() and json.loads(done.read_text()) == argv and all((folder / f).is_file() for f in needed):
            note(f"eval/{name}: evaluated already")
        else:
            note(f"eval/{name}: evaluating {', '.join(n for n, _ in models)}")
            evaluate.main(argv)
            write_atomic(done, json.dumps(argv) + "\n")
        results = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        return {r["name"]: r for r in results}

    def choose_lr(self, method: str, lrs: list[float], size: int, dev: Path) -> tuple[float, list[dict]]:
        """Of the learning rates whose dev answers are not `broken`, the one with the lowest dev NLL
        (mean of target and English) at `size` pairs. -> (lr, sweep rows)."""
        if len(lrs) == 1:
            return lrs[0], []
        base = dev_numbers(self.evaluate("dev-base", [("base", self.model)], dev=dev)["base"], self.lang)
        rows = []
        for lr in lrs:
            cell = self.train_cell(method, size, lr)
            got = dev_numbers(self.evaluate(f"dev-{cell.name}", [(method, str(cell / "model"))], dev=dev)[method], self.lang)
            rows.append({"kind": "sweep", "method": method, "size": size, "lr": lr, "cell": str(cell), **got,
                         "dev_score": dev_score(got), "broken": broken(got, base)})
        kept = [r for r in rows if math.isfinite(r["dev_score"]) and not r["broken"]]
        if not kept:
            why = "; ".join(f"{r['lr']:g}: {r['broken'] or 'dev NLL not finite'}" for r in rows)
            raise CloError(f"--lrs: every learning rate diverged or broke {method}'s dev answers ({why}); try smaller ones")
        best = min(kept, key=lambda r: (r["dev_score"], r["lr"]))
        for r in rows:
            r["chosen"] = r is best
        note(f"{method}: learning rate {best['lr']:g} (dev NLL {best['dev_score']:.4f}; "
             + ", ".join(f"{r['lr']:g}: {r['dev_score']:.4f}{' (' + r['broken'] + ')' if r['broken'] else ''}" for r in rows) + ")")
        return best["lr"], rows


def dev_numbers(result: dict, lang: str) -> dict:
    """What the sweep reads from one eval.py result on the dev split."""
    m = cell_metrics(result, lang)
    return {"dev_nll_t": m["nll_t"], "dev_nll_en": m["nll_en"], "dev_in_t": m["in_t"], "dev_en_in_en": m["en_in_en"],
            "dev_degenerate_t": m["degenerate_t"]}


def dev_score(dev: dict) -> float:
    """The sweep's score: the mean of the dev NLLs of target and English answers; NaN where eval.py wrote
    none (null: a diverged model's NaN), so that rate is never chosen."""
    nlls = (dev["dev_nll_t"], dev["dev_nll_en"])
    return math.nan if None in nlls else sum(nlls) / 2


def broken(dev: dict, base: dict) -> str | None:
    """Why a learning rate's dev answers count as broken, or None: English prompts answered in English,
    or target prompts in the target language, less than half as often as by the base model. Dev NLL
    alone misses this: a rate can lower the NLL of reference answers while the model's own answers
    turn empty (seen on MAFAND pairs, docs/study.md)."""
    for key, what in (("dev_en_in_en", "en prompts answered in en"), ("dev_in_t", "target prompts answered in the target language")):
        if dev[key] is not None and base[key] is not None and dev[key] < base[key] / 2:
            return f"{what} {100 * dev[key]:.0f}% vs the base model's {100 * base[key]:.0f}%"
    return None


def note(message: str) -> None:
    print(f"study: {message}", file=sys.stderr)


def digest(path: Path) -> str:
    """sha256 of a file's bytes: a rerun must see the same data."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def check_settings(path: Path, settings: dict) -> None:
    """The first run writes study.json; a rerun must have every setting equal (else one line naming it)."""
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError):
            raise CloError(f"{path}: not a study.json (field 'settings' missing or invalid JSON)") from None
        for key in settings:
            if saved.get(key) != settings[key]:
                raise CloError(f"{path.parent}: holds a study with {key} {saved.get(key)!r}, not {settings[key]!r}; choose another --out")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"settings": settings}, indent=2) + "\n")


def write_split(folder: Path, pairs: list, dev: int, seed: int) -> tuple[Path, Path]:
    """The pairs in one seeded order: the first `dev` are data/dev.jsonl, the rest data/pool.jsonl."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    lines = [pair_line(dataclasses.asdict(pairs[i])) for i in order]
    pool, dev_file = folder / "pool.jsonl", folder / "dev.jsonl"
    write_atomic(dev_file, "".join(lines[:dev]))
    write_atomic(pool, "".join(lines[dev:]))
    return pool, dev_file


def run_summary(cell: Path) -> dict:
    """What train.py recorded: examples used (after too-long ones were dropped), steps, losses."""
    run = json.loads((cell / "run.json").read_text(encoding="utf-8"))
    return {"examples": run.get("examples"), **run.get("summary", {})}


def cell_metrics(result: dict, lang: str) -> dict:
    """The numbers of METRICS from one eval.py result (None where eval.py did not measure it)."""
    return metrics_from(result.get("fidelity"), result.get("preference"), result.get("judge"), lang)


def cell_intervals(result: dict, lang: str) -> dict:
    """The 95% bootstrap interval [lo, hi] of each number of METRICS from one eval.py result (eval.py's
    `ci95`, over the held-out pairs and the answers; None where there is none, e.g. the win rate)."""
    ci = result.get("ci95") or {}
    return metrics_from(ci.get("fidelity"), ci.get("preference"), None, lang)


def metrics_from(fid: dict | None, pref: dict | None, judge: dict | None, lang: str) -> dict:
    """METRICS' keys from eval.py's fidelity (per prompt language), preference and judge sections,
    which hold the numbers and, in `ci95`, their intervals under the same names."""
    fid, pref, judge = fid or {}, pref or {}, judge or {}
    t, en = fid.get(lang) or {}, fid.get("en") or {}
    return {
        "in_t": t.get("in_lang_rate"), "in_t_ok": t.get("in_lang_rate_ok"), "degenerate_t": t.get("degenerate_rate"),
        "en_in_en": en.get("in_lang_rate"),
        **{k: pref.get(k) for k in ("nll_t", "nll_en", "pref_t", "pref_t_per_token", "margin_t", "pref_en", "margin_en")},
        "win_rate": judge.get("win_rate"),
    }  # fmt: skip


def differences(folder: Path, a: str, b: str, lang: str) -> dict:
    """Method a minus method b on one size's evaluation (eval.py's heldout.jsonl and generations.jsonl
    in `folder`), paired: {"metrics": {key: A − B}, "ci95": {key: [lo, hi]}} over METRICS' keys (None
    where a difference is not paired: the rate over non-degenerate answers, whose items differ by
    model, and the win rate, which is already a comparison)."""
    def lines(name):
        return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]

    scored, answers = lines("heldout.jsonl"), lines("generations.jsonl")
    pairs = heldout_differences([r for r in scored if r["model"] == a], [r for r in scored if r["model"] == b])
    rates = answer_differences([r for r in answers if r["model"] == a], [r for r in answers if r["model"] == b])
    t, en = rates.get(lang, {}), rates.get("en", {})
    got = {"in_t": t.get("in_lang_rate"), "degenerate_t": t.get("degenerate_rate"), "en_in_en": en.get("in_lang_rate"),
           **{k: pairs.get(k) for k in ("nll_t", "nll_en", "pref_t", "pref_t_per_token", "margin_t", "pref_en", "margin_en")}}
    got = {key: got.get(key) for key, *_ in METRICS}
    return {"metrics": {k: v and v["value"] for k, v in got.items()}, "ci95": {k: v and v["ci95"] for k, v in got.items()}}


def difference_cell(key: str, row: dict) -> str:
    """A paired difference with its interval; bold where the interval excludes 0 (rates in points)."""
    value, ci = row["metrics"][key], row["ci95"][key]
    if value is None:
        return "–"
    scale, unit = (100, " pt") if key in RATES else (1, "")
    text = f"{scale * value:+.1f}{unit}" if key in RATES else f"{value:+.3f}"
    if ci is None:
        return text
    lo, hi = (f"{scale * x:+.1f}" if key in RATES else f"{x:+.3f}" for x in ci)
    return f"**{text}** [{lo}, {hi}]" if ci[0] > 0 or ci[1] < 0 else f"{text} [{lo}, {hi}]"


def sweep_cell(r: dict) -> str:
    """One sweep run in the learning-rate table: dev NLL, answers in the target language / in English, broken or not."""
    answers = f" ({fmt('in_t', r['dev_in_t'])} / {fmt('en_in_en', r['dev_en_in_en'])})"
    return f"{r['dev_score']:.4f}" + answers + (" broken" if r["broken"] else "")


def with_interval(key: str, row: dict) -> str:
    """A table cell: the number, then its 95% interval in brackets where eval.py gave one."""
    ci = (row.get("ci95") or {}).get(key)
    if row["metrics"][key] is None or ci is None:
        return fmt(key, row["metrics"][key])
    lo, hi = (fmt(key, x).removesuffix("%") for x in ci)
    return f"{fmt(key, row['metrics'][key])} [{lo}, {hi}]"


def fmt(key: str, value) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if key in RATES else f"{value:.3f}"


def markdown(rows: list[dict], args, lang: str, settings: dict, pairs: Path, heldout: Path) -> str:
    base = next(r for r in rows if r["kind"] == "base")
    cells = {(r["method"], r["size"]): r for r in rows if r["kind"] == "cell"}
    sweep = [r for r in rows if r["kind"] == "sweep"]
    lines = [f"# Study: {', '.join(args.methods)} for {lang}, sizes {', '.join(map(str, args.sizes))}", "",
             f"Model `{args.model}`; training pairs: the first N of `{pairs}` shuffled (seed {args.seed}); "
             f"held-out pairs and prompts: `{heldout}`{' and ' + ', '.join(f'`{p}`' for p in args.prompts) if args.prompts else ''}. "
             f"Size 0 is the base model. Every number from eval.py (`eval/`), every cell from train.py (`cells/`).", ""]  # fmt: skip
    lines += ["## Learning rates", ""]
    if sweep:
        lines += [f"Chosen per method at {settings['sweep_size']} pairs on {settings['dev']} dev pairs held back from the training file, "
                  f"never the held-out set: of the rates whose dev answers did not break (en prompts answered in en, and {lang} prompts "
                  f"in {lang}, at least half as often as by the base model), the lowest dev NLL (mean of {lang} and en, per token). "
                  f"Each cell: dev NLL, then {lang} prompts answered in {lang} / en prompts in en.", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in settings["lrs"]) + " | chosen |",
                  "|---|" + "---|" * (len(settings["lrs"]) + 1)]  # fmt: skip
        for m in args.methods:
            by_lr = {r["lr"]: r for r in sweep if r["method"] == m}
            chosen = next(r["lr"] for r in by_lr.values() if r["chosen"])
            lines.append(f"| {m} | " + " | ".join(sweep_cell(by_lr[lr]) for lr in settings["lrs"]) + f" | {chosen:g} |")
    else:
        lines.append(f"One learning rate for every method: {settings['lrs'][0]:g} (no sweep).")
    for key, label, what, better in METRICS:
        if all(r["metrics"][key] is None for r in rows if r["kind"] in ("base", "cell")):
            continue
        lines += ["", f"## {label.format(t=lang)}", "", f"{what.format(t=lang)}; {better} is better. In brackets: the 95% bootstrap "
                  "interval over the held-out sample (clo/eval/bootstrap.py).", "",
                  "| method | 0 | " + " | ".join(map(str, args.sizes)) + " |", "|---|---|" + "---|" * len(args.sizes)]
        for m in args.methods:
            lines.append(f"| {m} | {with_interval(key, base)} | " + " | ".join(with_interval(key, cells[m, n]) for n in args.sizes) + " |")
    diffs = {(r["method"], r["size"]): r for r in rows if r["kind"] == "difference"}
    for m in dict.fromkeys(m for m, _ in diffs):
        lines += ["", f"## {m} − sft, paired", "", f"Each number: {m}'s minus SFT's at the same size, on the same held-out pairs and "
                  "prompts; in brackets the 95% paired-bootstrap interval of the difference (clo/eval/paired.py), **bold** where it "
                  "excludes 0. Rates in percentage points; the sign is not \"better\": see each metric's direction above.", "",
                  "| metric | " + " | ".join(map(str, args.sizes)) + " |", "|---|" + "---|" * len(args.sizes)]
        for key, label, _, better in METRICS:
            if all(diffs[m, n]["metrics"][key] is None for n in args.sizes):
                continue
            lines.append(f"| {label.format(t=lang)} ({better} is better) | " + " | ".join(difference_cell(key, diffs[m, n]) for n in args.sizes) + " |")
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(lines)


PLOT_COLUMNS = 4
PLOT_CELL = (4.0, 3.0)  # inches per metric
PLOT_DPI = 100


def plot(rows: list[dict], methods: list[str], lang: str, path: Path) -> None:
    """study.png: one panel per metric, against data size, a line per method with its 95% interval as a
    band, the base model dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["kind"] == "base")
    cells = [r for r in rows if r["kind"] == "cell"]
    shown = [m for m in METRICS if any(r["metrics"][m[0]] is not None for r in cells)]
    n_rows = math.ceil(len(shown) / PLOT_COLUMNS)
    fig, axes = plt.subplots(n_rows, PLOT_COLUMNS, figsize=(PLOT_CELL[0] * PLOT_COLUMNS, PLOT_CELL[1] * n_rows), dpi=PLOT_DPI, squeeze=False)
    for ax, (key, label, _, better) in zip(axes.flat, shown):
        scale = 100 if key in RATES else 1
        for m in methods:
            mine = sorted((r for r in cells if r["method"] == m and r["metrics"][key] is not None), key=lambda r: r["size"])
            line = ax.plot([r["size"] for r in mine], [scale * r["metrics"][key] for r in mine], marker="o", label=m)[0]
            ci = [(r["size"], (r.get("ci95") or {}).get(key)) for r in mine]
            ci = [(x, lo_hi) for x, lo_hi in ci if lo_hi is not None]
            if ci:  # the 95% interval as a band in the line's colour
                ax.fill_between([x for x, _ in ci], [scale * lo for _, (lo, _) in ci], [scale * hi for _, (_, hi) in ci],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        if base["metrics"][key] is not None:
            ax.axhline(scale * base["metrics"][key], color="gray", linestyle="--", label="base")
            if (base.get("ci95") or {}).get(key):
                ax.axhspan(*(scale * x for x in base["ci95"][key]), color="gray", alpha=0.1, linewidth=0)
        if key in RATES:
            ax.set_ylim(-5, 105)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["size"] for r in cells}), [str(s) for s in sorted({r["size"] for r in cells})])
        ax.set_title(label.format(t=lang), fontsize=9)
        ax.set_xlabel("training pairs", fontsize=8)
        ax.set_ylabel(("%" if key in RATES else "nats") + f" ({better} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


if __name__ == "__main__":
    run_cli(main)
