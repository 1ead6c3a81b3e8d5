"""Compare checkpoints: do they answer in the prompt's language, are the answers usable, is English kept.

    # the default model vs a CLO run vs an SFT run, on the held-out demo prompts for Swahili
    python eval.py --lang sw --models smollm2-135m-instruct runs/clo-sw/model runs/sft-sw/model
    # AlpacaEval's 805 English prompts and a translated set, MMLU, a local judge
    python eval.py --lang sw --models A B --prompts alpaca_eval_805.jsonl sw_alpaca_eval.jsonl \\
        --mmlu mmlu/data/test/*_test.csv --mmlu-shots 5 --judge /path/to/Qwen2.5-7B-Instruct

Reads top to bottom: check every input (prompt files, held-out pairs, CSVs, checkpoint folders)
and --out before any model runs; then for each model, one at a time in memory:
  1. answer every prompt (greedy, batched, KV cache, training's chat format) and grade each answer:
     its language (py3langid over --langs) and whether it is degenerate (clo/eval/degenerate.py);
  2. score the held-out pairs without generating: preference for the answer in the prompt's
     language, the log-prob margin, and the NLL of reference answers (clo/eval/preference.py);
  3. multiple-choice accuracy on MMLU-format CSVs (clo/eval/mc.py), if given;
then, with --judge, judge every model against the first (clo/eval/judge.py), and write into --out:

    generations.jsonl       one line per prompt per model (answer, its language, degenerate or not)
    heldout.jsonl           one line per held-out pair per model: its four sequence log-probs and lengths
                            (what study.py's paired differences resample; clo/eval/paired.py)
    metrics.json/.jsonl     every number, per model (the JSON also holds the settings); `ci95`: the 95%
                            bootstrap interval of each rate and held-out number (clo/eval/bootstrap.py)
    judgments.jsonl         with --judge: one line per prompt, presentation order and model pair
    alpaca_eval/<name>.json each model's answers in AlpacaEval's format, for an external judge
    report.md, report.png   the comparison table, and its main rates as a bar chart

All files are written at the end, each atomically: a failed run leaves nothing half-written. An
existing --out must hold nothing but these (an earlier eval.py run's, which are replaced; those this
run does not write, judgments.jsonl without --judge or another model's alpaca_eval file, are removed).
Numbers are standard JSON: a diverged model's NaN is written as null.

    torchrun --nproc-per-node N eval.py ...     # N processes (GPUs: one each; CPU: gloo)

splits the prompts, held-out pairs, questions and judge prompts across processes, each holding the
whole model: they take in turn the batches one process forms, so every number and file is the
1-process run's (tests/test_eval_distributed.py); process 0 takes the lock, writes and reports.
Limitations: greedy decoding only; each process holds the whole model (no sharding); judged pairs
are each model vs the first.
"""

import argparse
import gc
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from clo.atomic import write_atomic
from clo.errors import ArgumentParser, CloError, run_cli
from clo.eval.degenerate import COPY_THRESHOLD, NGRAM, REPEAT_THRESHOLD
from clo.eval.generation import fidelity, fidelity_intervals, generate_answers, grade_answers
from clo.eval.judge import alpaca_eval_outputs, judge_pairs
from clo.eval.langid import DEFAULT_LANGS, LanguageId
from clo.eval.mc import dev_file_for, evaluate_mc, read_mc_csv
from clo.eval.preference import four_way_logps, heldout_rows, preference_intervals, preference_metrics
from clo.eval.prompts import load_prompts
from clo.eval.report import markdown_report, plot_main_numbers, write_json, write_jsonl
from clo.languages import target_language
from clo.lock import output_lock
from clo.model.chat import detect_format
from clo.model.config import ModelConfig
from clo.model.hf_folder import load_model, weight_files
from clo.model.sources import DEFAULT_MODEL, resolve_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs
from clo.runtime import on_for_cuda, resolve_device
from clo.train.batching import encode_all
from clo.world import World, start


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lang", required=True, help="target language: sw, yo, id, ko, zh or de")
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL], help="checkpoints to compare: HF folders, hub ids, or the default model's name")
    p.add_argument("--names", nargs="+", help="a short name per model for the report (default: from the folder, runs/X/model -> X)")
    p.add_argument("--prompts", nargs="+", help="prompt files to answer: AlpacaEval JSON/JSONL ('instruction'), or cross-lingual JSONL (its target and English prompts); default: the --heldout file")
    p.add_argument("--prompts-lang", default="en", help="expected answer language of AlpacaEval-format records without a 'lang' field")
    p.add_argument("--heldout", help="cross-lingual JSONL of held-out pairs for preference and NLL; default: data/demo/<lang>.heldout.jsonl")
    p.add_argument("--mmlu", nargs="+", metavar="CSV", help="MMLU-format CSVs (question, A, B, C, D, answer), one subject each")
    p.add_argument("--mmlu-shots", type=int, default=0, help="few-shot examples per question, from the subject's dev file")
    p.add_argument("--judge", help="a local instruct checkpoint that judges each model against the first, both orders")
    p.add_argument("--judge-language-check", choices=["langid", "judge"], default="langid", help="langid: an answer in the wrong language loses without asking the judge; judge: left to the judge prompt")
    p.add_argument("--judge-max-new-tokens", type=int, default=16, help="longest judge reply")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--no-generate", dest="generate", action="store_false", help="answer no prompts: held-out scoring and multiple choice only (no --prompts, no --judge)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts (or held-out pairs, or questions) per forward batch; under torchrun each process takes whole batches in turn")
    p.add_argument("--max-length", type=int, default=1024, help="held-out pairs with a longer (prompt + answer) are skipped and counted")
    p.add_argument("--limit", type=int, default=0, help="use only the first N records of each prompt file, held-out set and CSV (0: all)")
    p.add_argument("--langs", nargs="+", default=list(DEFAULT_LANGS), help="languages the language identifier may answer")
    p.add_argument("--copy-threshold", type=float, default=COPY_THRESHOLD, help="an answer whose n-grams are at least this share from the prompt is a copy")
    p.add_argument("--repeat-threshold", type=float, default=REPEAT_THRESHOLD, help="an answer whose n-grams are at least this share repeats is a loop")
    p.add_argument("--ngram", type=int, default=NGRAM, help="n of the copy / repeat n-grams")
    p.add_argument("--out", help="output folder (default: runs/eval-<lang>)")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--chat-format", default="auto", help="auto, chatml, llama3, llama2, mistral or plain (for every model)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="answer with a compiled decode step, a CUDA graph on CUDA "
                   "(auto: on for CUDA; ~30 s per batch shape for a 7B model, then several times faster decoding)")
    args = p.parse_args(argv)
    for flag in ("max_new_tokens", "batch_size", "max_length", "judge_max_new_tokens", "ngram"):
        if getattr(args, flag) < 1:
            raise CloError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if not args.generate and (args.prompts or args.judge):
        raise CloError(f"--no-generate: answers no prompts, so {'--prompts' if args.prompts else '--judge'} has nothing to work on")
    for flag in ("limit", "mmlu_shots"):
        if getattr(args, flag) < 0:
            raise CloError(f"--{flag.replace('_', '-')}: must be >= 0, got {getattr(args, flag)}")
    for flag in ("copy_threshold", "repeat_threshold"):
        if not 0 < getattr(args, flag) <= 1:
            raise CloError(f"--{flag.replace('_', '-')}: must be in (0, 1], got {getattr(args, flag)}")
    args.device = resolve_device(args.device)
    return args


# A collective waits for the slowest process's share (a batch of generation more than the others:
# minutes for a 7B model on a CPU); a process that dies is noticed at once (torchrun stops the
# rest), so this only bounds a hang.
COLLECTIVE_TIMEOUT_S = 3600

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype (auto: bf16 on CUDA, fp32 on CPU)

# What eval.py writes into --out (a file, or a folder for alpaca_eval); see the docstring.
OUTPUTS = {"generations.jsonl": False, "heldout.jsonl": False, "metrics.jsonl": False, "metrics.json": False, "judgments.jsonl": False,
           "report.md": False, "report.png": False, "alpaca_eval": True}


def check_out(out: Path) -> None:
    """--out can take eval.py's files, checked before any work (a run that fails after an hour of
    generation because of --out loses that hour): it is a folder or can be made one, and holds
    nothing but what an earlier eval.py run wrote, which it may replace (a training run's
    metrics.jsonl, say, must not be)."""
    folder = out
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CloError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise CloError(f"--out {out}: {folder} is not writable")
    if folder != out:
        return
    for entry in sorted(out.iterdir()):
        if any(entry.name.startswith(f".{name}.") for name in OUTPUTS):
            continue  # the temporary file of an interrupted write (clo/atomic.py write_atomic)
        if entry.name not in OUTPUTS:
            raise CloError(f"--out {out}: holds {entry.name}, which eval.py does not write; choose another --out")
        if entry.is_symlink():  # eval.py replaces and removes files in there: never through a link to elsewhere
            raise CloError(f"--out {out}: {entry.name} is a link; eval.py writes its own files there, not through a link")
        if entry.is_dir() != OUTPUTS[entry.name]:
            raise CloError(f"--out {out}: {entry.name} is a {'folder' if entry.is_dir() else 'file'}; eval.py writes a {'folder' if OUTPUTS[entry.name] else 'file'} there")


def model_name(spec: str, folder: Path) -> str:
    if spec == DEFAULT_MODEL:
        return DEFAULT_MODEL
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" else folder.name


def file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def unique(names: list[str]) -> list[str]:
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate in out:
            candidate, k = f"{name}-{k}", k + 1
        out.append(candidate)
    return out


def check_checkpoint(spec: str, chat_format: str) -> Path:
    """Resolve a model and check, cheaply, that it will load: config, weight headers, tokenizer, chat format."""
    from safetensors import safe_open

    folder = resolve_model(spec)
    ModelConfig.from_folder(folder)

    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:  # a truncated or foreign file: the safetensors library's own message
            raise CloError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    detect_format(load_tokenizer(folder), chat_format)
    return folder


def load_checked(folder: Path, device, dtype):
    try:
        return load_model(folder, device, dtype)
    except CloError:
        raise
    except Exception as e:
        raise CloError(f"{folder}: checkpoint does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


@dataclass
class Inputs:
    """Everything eval.py reads, checked before any model runs."""

    heldout_path: Path
    heldout: list  # the held-out cross-lingual pairs
    prompt_files: list[Path]
    prompts: list  # EvalPrompt, every file's
    mmlu: list  # one question list per --mmlu file
    mmlu_dev: list  # its few-shot dev questions, or None
    folders: list[Path]  # one per --models
    names: list[str]
    judge_folder: Path | None


def main(argv=None):
    args = parse_args(argv)
    lang = target_language(args.lang)
    out = Path(args.out or f"runs/eval-{lang.code}")
    world = start(args.device, COLLECTIVE_TIMEOUT_S)  # one process, or the N that torchrun started

    # 0. Every input and output is checked before any model runs: a typo costs seconds, not an hour.
    # Every process checks (the same files, the same verdict); a failure on process 0 alone (the lock)
    # ends it, and torchrun then stops the others.
    check_out(out)
    langid = LanguageId(args.langs)
    for needed in (lang.code, "en"):
        if needed not in langid.langs:  # no answer could be identified as it: its rate would read 0%
            raise CloError(f"--langs {' '.join(args.langs)}: must include {needed}, the language of the prompts it grades")
    inputs = read_inputs(args, lang.code, world)
    with output_lock(out) if world.main else nullcontext():  # one eval per --out: a second stops at once
        # 1-3. Each model in turn: generate and grade, held-out preference and NLL, multiple choice.
        results, generations, scored = [], {}, {}
        for name, folder in zip(inputs.names, inputs.folders):
            result, generations[name], scored[name] = evaluate_model(name, folder, inputs, langid, args, world)
            results.append(result)
        # 4. Pairwise judging: every model against the first, both presentation orders.
        judgments = judge_all(inputs, results, generations, args, world) if inputs.judge_folder is not None else []
        # 5. Outputs, each file atomically, by process 0 (every process holds the same results).
        if world.main:
            write_outputs(out, lang.code, inputs, results, generations, scored, judgments, args)
    world.leave()  # under torchrun every process but 0 exits here
    return results


def note(world: World, message: str) -> None:
    """A progress line on stderr, from process 0 only (the others would repeat it)."""
    if world.main:
        print(f"eval: {message}", file=sys.stderr)


def read_inputs(args, lang: str, world: World = World()) -> Inputs:
    """Read and check every input file and model folder (cheaply), before any model runs."""
    heldout_path = Path(args.heldout) if args.heldout else demo_path(lang, heldout=True)
    heldout = load_pairs(heldout_path, lang).examples
    heldout = heldout[: args.limit] if args.limit else heldout
    prompt_files = [Path(p) for p in args.prompts] if args.prompts else [heldout_path] if args.generate else []
    prompts = [p for path in prompt_files for p in load_prompts(path, args.prompts_lang, args.limit)]
    keys = [(p.set, p.id, p.lang) for p in prompts]
    if len(set(keys)) != len(keys):
        raise CloError("--prompts: two prompt files share a name; rename one (prompts are matched by file name and id)")
    mmlu = [read_mc_csv(path) for path in args.mmlu or []]
    mmlu_dev = [None] * len(mmlu)
    if args.mmlu_shots:
        mmlu_dev = [read_mc_csv(d) if (d := dev_file_for(Path(path))) else None for path in args.mmlu]
    if args.judge and len(args.models) < 2:
        raise CloError("--judge: needs at least two --models (each is judged against the first)")
    if args.names and len(args.names) != len(args.models):
        raise CloError(f"--names: {len(args.names)} names for {len(args.models)} models")
    folders = [check_checkpoint(spec, args.chat_format) for spec in args.models]
    judge_folder = check_checkpoint(args.judge, "auto") if args.judge else None
    names = unique(args.names or [model_name(spec, folder) for spec, folder in zip(args.models, folders)])
    exports = {}
    for name in names:  # one AlpacaEval file per model: two names must not map to one file
        if (other := exports.setdefault(file_safe(name), name)) != name:
            raise CloError(f"--names: {other!r} and {name!r} would both be written to alpaca_eval/{file_safe(name)}.json")
    processes = f" x {world.size} processes" if world.distributed else ""
    note(world, f"{len(prompts)} prompts from {', '.join(map(str, prompt_files))}; {len(heldout)} held-out pairs from {heldout_path}; "
                f"{sum(map(len, mmlu))} multiple-choice questions; {len(folders)} models; device {args.device}{processes}")
    return Inputs(heldout_path, heldout, prompt_files, prompts, mmlu, mmlu_dev, folders, names, judge_folder)


def evaluate_model(name: str, folder: Path, inputs: Inputs, langid: LanguageId, args, world: World = World()) -> tuple[dict, list[dict], list[dict]]:
    """One model: answers generated and graded, held-out preference and NLL, multiple choice.
    -> (result, graded answers, held-out pair rows)
    N processes share each step's batches; every process returns the whole result."""
    note(world, f"{name} ({folder})")
    device = world.device(args.device)
    model = load_checked(folder, device, DTYPES[args.dtype])
    tok = load_tokenizer(folder)
    fmt = detect_format(tok, args.chat_format)
    answers = generate_answers(model, tok, fmt, inputs.prompts, args.max_new_tokens, args.batch_size, desc=f"generate {name}",
                               compile=on_for_cuda(args.compile, device), world=world) if inputs.prompts else []
    records = grade_answers(name, inputs.prompts, answers, langid, args.max_new_tokens, args.copy_threshold, args.repeat_threshold, args.ngram)

    encoded, too_long = encode_all(tok, fmt, inputs.heldout, args.max_length)
    preference, ci95, scored = None, {"fidelity": fidelity_intervals(records), "preference": None}, []
    if encoded:
        logps = four_way_logps(model, encoded, tok.pad_id, args.batch_size, world=world)
        preference = preference_metrics(logps, encoded)
        preference["skipped_too_long"] = too_long
        ci95["preference"] = preference_intervals(logps, encoded)
        scored = heldout_rows(name, logps, encoded)
    mc = evaluate_mc(model, tok, inputs.mmlu, inputs.mmlu_dev, args.mmlu_shots, args.batch_size, args.limit, world) if inputs.mmlu else None

    sets = sorted({r["set"] for r in records})
    result = {
        "name": name, "model": str(folder), "chat_format": fmt.name,
        "fidelity": fidelity(records),
        "fidelity_by_set": {s: fidelity([r for r in records if r["set"] == s]) for s in sets},
        "preference": preference, "mc": mc, "judge": None,
        "ci95": ci95,  # 95% bootstrap intervals of the fidelity rates and the preference numbers (clo/eval/bootstrap.py)
    }  # fmt: skip
    del model
    gc.collect()
    return result, records, scored


def judge_all(inputs: Inputs, results: list[dict], generations: dict, args, world: World = World()) -> list[dict]:
    """Every model after the first judged against the first, in both orders; fills result["judge"]. -> judgment rows."""
    note(world, f"judging with {inputs.judge_folder}")
    judge = load_checked(inputs.judge_folder, world.device(args.device), DTYPES[args.dtype])
    judge_tok = load_tokenizer(inputs.judge_folder)
    judge_fmt = detect_format(judge_tok)  # the judge speaks its own format
    baseline, judgments = inputs.names[0], []
    for result in results[1:]:
        rows, summary = judge_pairs(
            judge, judge_tok, judge_fmt, generations[result["name"]], generations[baseline],
            args.batch_size, args.judge_max_new_tokens, args.judge_language_check, world,
        )  # fmt: skip
        result["judge"] = {"against": baseline, "judge": str(inputs.judge_folder), **summary}
        judgments += [{"model_a": result["name"], "model_b": baseline, **row} for row in rows]
    del judge
    gc.collect()
    return judgments


def write_outputs(out: Path, lang: str, inputs: Inputs, results: list[dict], generations: dict, scored: dict, judgments: list[dict], args) -> None:
    settings = vars(args) | {"heldout": str(inputs.heldout_path), "prompts": [str(p) for p in inputs.prompt_files], "device": str(args.device)}
    write_jsonl(out / "generations.jsonl", [r for name in inputs.names for r in generations[name]])
    write_jsonl(out / "heldout.jsonl", [r for name in inputs.names for r in scored[name]])
    write_jsonl(out / "metrics.jsonl", results)
    write_json(out / "metrics.json", {"lang": lang, "settings": settings, "models": results})
    if judgments:
        write_jsonl(out / "judgments.jsonl", judgments)
    exported = {out / "alpaca_eval" / f"{file_safe(name)}.json" for name in inputs.names}
    for name in inputs.names:
        write_json(out / "alpaca_eval" / f"{file_safe(name)}.json", alpaca_eval_outputs(generations[name], name))
    # an earlier run's files that this run does not write would no longer match metrics.json: removed
    stale = ([] if judgments else [out / "judgments.jsonl"]) + [p for p in (out / "alpaca_eval").glob("*.json") if p not in exported]
    for path in stale:
        path.unlink(missing_ok=True)
    report = markdown_report(results, lang, settings)
    write_atomic(out / "report.md", report)
    plot_main_numbers(results, lang, out / "report.png")
    print(report.split("\n## ")[0], file=sys.stderr)
    print(f"eval: wrote {out}/report.md and report.png", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
