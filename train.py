"""Train a model to answer in the prompt's language with Cross-Lingual Optimization (arXiv 2505.14297).

    python train.py --lang sw                        # CLO on the demo set, default model, CPU or GPU
    python train.py --lang sw --method sft           # baseline: SFT on the target-language pairs
    python train.py --lang sw --method sft-dpo       # baseline: SFT, then DPO from the SFT model
    torchrun --nproc-per-node 4 train.py --lang sw   # the same run on 4 GPUs (FSDP2; clo/train/distributed.py)

`train()` reads top to bottom like the method: data -> four sequences per example -> model ->
reference log-probs (once, cached) -> stages of steps with the CLO loss -> an HF-format model folder.

    L_CLO = λ·NLL(y_t | x_t) + (1−λ)·L_CL      (docs/paper.md "Loss"; clo/train/loss.py)

The pieces live in clo/train: the step (step.py), what trains (stages.py), the precision policy
(precision.py), the schedule (schedule.py), the run folder, resume and Ctrl-C (run.py), N processes
(distributed.py).
Features: stages of parameter groups (`--stages attn:1,all:1`), optional LoRA, AdamW with fp32
master weights and bf16 autocast on CUDA, linear warmup/decay, gradient accumulation and clipping,
torch.compile of each block on CUDA, optional activation checkpointing, metrics as JSONL, atomic
checkpoints with exact `--resume` (refused when a setting that changes the computation differs),
Ctrl-C / SIGTERM save between steps, one run per --out (a lock), the SFT+DPO baseline as one command.
Under torchrun: N processes (NCCL on CUDA, gloo on CPU) with FSDP2, the same global batches and
the same numbers as one process; a resume needs the same number of processes.
Limitations: single-turn examples only; examples longer than --max-length are dropped, not cut;
under torchrun each process writes its own part of a
checkpoint, so every process must see the same --out (one machine, or a shared file system).
"""

import argparse
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from clo.errors import ArgumentParser, CloError, run_cli
from clo.eval.preview import Preview
from clo.languages import target_language
from clo.lock import output_lock
from clo.model.chat import detect_format
from clo.model.hf_folder import load_model, save_model
from clo.model.sources import DEFAULT_MODEL, cache_dir, resolve_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs
from clo.runtime import on_for_cuda, resolve_device
from clo.train.batching import encode_all
from clo.train.distributed import check_batch, gather_into, load_optimizer_state, load_sharded, load_weights
from clo.train.precision import check_precision_flags, checkpoint_dtype, restore_originals, training_precision
from clo.train.reference import cache_key, cached_reference_logps, compute_reference_logps, data_digest, model_fingerprint
from clo.train.run import Run
from clo.train.schedule import DEFAULT_MODEL_LR, PAPER_LR, Position, Schedule, default_lr, lr_at
from clo.train.scoring import Batching
from clo.train.stages import begin_stage, lora_targets, parse_stages
from clo.train.step import SFT_SEQUENCES, Objective, optimizer_step
from clo.world import World, start


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lang", required=True, help="target language: sw, yo, id, ko, zh or de")
    p.add_argument("--data", help="cross-lingual JSONL (translate.py writes it); default: the demo set data/demo/<lang>.jsonl")
    p.add_argument("--max-examples", type=int, default=0, help="use only the first N examples (the paper's data-size study: 200 .. 6400); 0: all")
    p.add_argument("--model", "--init", dest="model", default=DEFAULT_MODEL, help="starting checkpoint: an HF folder, a hub id, or the default; also the reference policy of clo and dpo")
    p.add_argument("--method", choices=["clo", "sft", "sft-dpo", "dpo"], default="clo",
                   help="clo: the paper's method. sft: baseline 1, NLL on the target-language pairs. sft-dpo: baseline 2, "
                        "SFT into <out>/sft, then DPO on the same pairs with the SFT model as start and reference, into <out>. "
                        "dpo: the DPO phase alone, from --model (give it an SFT model; from a base model it is not the paper's baseline). "
                        "--max-steps applies to each phase of sft-dpo. "
                        "Every method trains --stages (default: attention only, as the paper's CLO does), so that a comparison "
                        "differs in the loss alone; --stages all:2 trains everything")
    p.add_argument("--sft-on", choices=list(SFT_SEQUENCES), default="target", help="--method sft: which responses get the NLL")
    p.add_argument("--lam", type=float, default=0.5, help="λ: weight of the NLL term (paper: 0.5)")
    p.add_argument("--beta", type=float, default=0.1, help="β of the DPO-style terms (paper: 0.1)")
    p.add_argument("--directions", choices=["mean", "sum"], default="mean", help="combine the two preference directions by mean or sum")
    p.add_argument("--stages", default="attn:2", help="GROUP:EPOCHS,... groups: attn mlp embed norm head all (paper: attention only, 2 epochs)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the stage's groups instead of full weights")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lr", default="auto", help=f"peak learning rate (auto: the paper's 7B recipe, {PAPER_LR}, except "
                   f"{DEFAULT_MODEL_LR} for the embedded default model, chosen by study.py's sweep, docs/study.md)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, on matrices only (never on norm gains or biases)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (each is 4 sequences); under torchrun the global micro-batch, split across the processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step; the step's loss is that of all their examples as one batch (NLL per token, DPO terms per example)")
    p.add_argument("--max-length", type=int, default=512, help="longest sequence in tokens; longer examples are dropped")
    p.add_argument("--bucket", type=int, default=0, help="pad lengths to a multiple of this, so compiled shapes stay few (0: 64 when compiling, else 8)")
    p.add_argument("--length-groups", type=int, default=0, help="run each micro-batch's sequences as N length-sorted groups, each padded to its own longest: the same numbers from fewer padded tokens (0: auto, 4 on CPU, 1 on CUDA); only with --packing off")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="packed, prefix-shared rows: each prompt computed once, no padding but each row's tail (clo/train/packing.py); "
                        "off: padded batches in length groups (auto: on for CPUs, 1.13x faster over the default job's steps on an AMD EPYC; off on CUDA until its kernel is tested there, though 1.75x faster on an H200)")
    p.add_argument("--attention", choices=["auto", "sdpa", "gathered", "flex"], default="auto",
                   help="the attention kernel of packed rows: sdpa (one call per row, a dense boolean mask), gathered (SDPA per sequence, "
                        "q/k/v gathered out of the rows) or flex (FlexAttention's block-sparse fused kernel, compiled; bucket auto 128); "
                        "auto: flex on CUDA, gathered on CPU (clo/train/packing.py)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: run all stages); the schedule still follows the stages, so a later --resume may raise it")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and initialisation")
    p.add_argument("--out", help="output folder (default: runs/<method>-<lang>)")
    p.add_argument("--save-every", type=int, default=100, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt; every setting that changes the computation must match the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (without it, such an --out is refused)")
    p.add_argument("--recompute-reference", action="store_true", help="compute the reference log-probs again even if they are cached")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="dtype frozen weights are held in (auto: bf16 on CUDA, fp32 on CPU); bfloat16 needs bf16 autocast (not --amp off); saved weights are exact either way")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast for compute (auto: on for CUDA, for CPUs with AMX or AVX512_BF16, where bf16 matmuls are 2-8x faster than fp32, and with --dtype bfloat16; off: fp32 compute)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the decoder (auto: on for CUDA)")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute each block in backward: much less activation memory, ~1/3 more compute")
    p.add_argument("--chat-format", default="auto", help="auto, chatml, llama3, llama2, mistral or plain")
    p.add_argument("--save-merged", action="store_true", help="with --lora: also write merged full weights to <out>/model (sft-dpo's SFT phase always does: its DPO phase starts from them)")
    p.add_argument("--show-answers", type=int, default=4, help="at the end, the starting and the trained model's greedy answers to the first N "
                   "held-out demo prompts of --lang, and how many are in --lang (0: off; one process only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    world = start(resolve_device(args.device))  # one process, or the N that torchrun started
    out = sft_then_dpo(args, world) if args.method == "sft-dpo" else train(args, world)
    world.leave()  # under torchrun every process but 0 exits here, as eval.py's and translate.py's do (clo/world.py)
    return out


def train(args, world: World = World(), locked: bool = False) -> Path:
    """One training run (clo, sft or dpo) from validated flags (locked: the caller holds --out's lock). -> the output folder."""
    lang = target_language(args.lang)
    stages = parse_stages(args.stages)
    device = world.device(resolve_device(args.device))
    precision = training_precision(device, args.dtype, args.amp, sharded=world.size > 1)
    if args.attention == "flex" and device.type != "cuda" and args.packing != "off":
        raise CloError(f"--attention flex: FlexAttention has no backward pass on CPU (torch {torch.__version__}); use --attention gathered, sdpa or auto")
    compiled = on_for_cuda(args.compile, device)
    check_processes(args, world)
    objective = Objective(args.method, beta=args.beta, lam=args.lam, directions=args.directions, sft_on=args.sft_on)
    with Run(Path(args.out or f"runs/{args.method}-{lang.code}"), resume=args.resume, overwrite=args.overwrite, world=world, locked=locked) as run:
        random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

        # 1. Data: every line validated before anything expensive (nothing is printed before the last
        # check), then each example as four sequences: x_en→y_en, x_en→y_t, x_t→y_t, x_t→y_en.
        data_path = Path(args.data) if args.data else demo_path(lang.code)
        pairs = load_pairs(data_path, lang.code)
        folder = resolve_model(args.model)
        run.check_inputs(**{"--model": folder, "--data": data_path})
        tok = load_tokenizer(folder)
        fmt = detect_format(tok, args.chat_format)
        examples, too_long = encode_all(tok, fmt, pairs.examples[: args.max_examples or None], args.max_length)
        if not examples:
            raise CloError(f"{data_path}: every example is longer than --max-length {args.max_length}")
        batching = Batching.resolve(tok.pad_id, args.bucket, args.length_groups, device, compiled, args.packing, args.attention)

        # 2. Model: frozen weights in the precision policy's dtype, trainable ones in fp32 per stage
        # (clo/train/precision.py). A resume must match everything that decides what this run computes.
        saved = run.saved_checkpoint()
        if world.size > 1:  # FSDP2 over the blocks and the root, sharded as it loads (clo/train/distributed.py)
            adapters = (lambda m: add_lora(m, stages, args)) if args.lora else None
            model = load_sharded(folder, world, device, precision.gathered, adapters)
        else:  # one process has nothing to shard
            model = load_model(folder, device, precision.frozen)
        model_id = model_fingerprint(folder, memo=cache_dir() / "fingerprints.json")
        settings = run_settings(args, batching, fmt, precision, model_id, data_digest(examples), world.size)
        ckpt = run.check_resume(saved, settings, SETTING_FLAGS)
        if world.main:
            print(f"data: {data_path}: {pairs.summary()}, {too_long} longer than {args.max_length} tokens dropped; chat format {fmt.name}", file=sys.stderr)
        preview = Preview(model, tok, fmt, lang.code, args.show_answers if world.size == 1 else 0)  # the starting model's answers
        if args.lora and world.size == 1:
            add_lora(model, stages, args)

        # 3. Reference log-probs of the starting model: once, cached on disk, never a second model in memory.
        ref_table = reference_table(model, examples, batching, precision, model_id, args, world) if objective.needs_reference else None

        # 4. Stages of optimizer steps, resumed from the checkpoint's position if there is one.
        schedule = Schedule(tuple(stages), len(examples), args.batch_size, args.grad_accum, args.seed)
        pos = run.begin(ckpt, {**vars(args), "bucket": batching.bucket, "length_groups": batching.groups, "packing": batching.packing, "model_folder": str(folder),
                               "data": str(data_path), "chat_format": fmt.name, "examples": len(examples), "total_steps": schedule.total_steps})
        trained = train_stages(model, examples, ref_table, schedule, pos, objective, batching, precision,
                               run=run, ckpt=ckpt, settings=settings, source=folder, compiled=compiled, args=args)
        run.summarize(device)

        # 5. Outputs: an HF-format folder transformers loads (and a PEFT adapter with --lora).
        if world.size > 1:
            model = gathered_model(model, folder, stages, args, world)  # a whole copy on process 0, None elsewhere
        if world.main:
            save_outputs(model, folder, trained, run.out, fmt.name, args)
            preview.show(model)  # 6. What changed: the same prompts answered before and after
        world.barrier()
    return run.out


def train_stages(model, examples, ref_table, schedule: Schedule, pos: Position, objective: Objective, batching: Batching,
                 precision, *, run: Run, ckpt, settings: dict, source: Path, compiled: bool, args) -> set[str]:
    """Every optimizer step from `pos` on; a new stage rebuilds the optimizer over what it trains.
    Ctrl-C / SIGTERM are read between steps, so an update is never saved without its position.
    -> the names of the parameters that trained."""
    trained: set[str] = set()
    if ckpt is not None:
        load_weights(model, ckpt["weights"])
        trained = set(ckpt["weights"])
    total = schedule.total_steps
    optimizer, stage_idx, saved_at = None, None, None

    def save():
        nonlocal saved_at
        if saved_at != pos.step:  # the last step may just have been saved by --save-every: not twice (13B: ~67 GB)
            run.save(model, trained, optimizer, pos, settings)
            saved_at = pos.step

    with run.steps(min(total, args.max_steps) if args.max_steps else total, pos.step, f"{args.method} {args.lang}"):
        for s, epoch, micro in schedule.steps_from(Position(**vars(pos))):
            if (args.max_steps and pos.step >= args.max_steps) or run.stop_requested():
                break
            if s != stage_idx:
                stage_idx, stage = s, schedule.stages[s]
                optimizer, trainable, counts = begin_stage(model, stage.groups, lora=args.lora, lr=args.lr, weight_decay=args.weight_decay, compile=compiled,
                                                           checkpoint_activations=args.checkpoint_activations, source=source, trained=trained)
                trained |= {n for n, p in model.named_parameters() if p.requires_grad}
                if run.world.main:
                    run.bar.write(f"stage {s + 1}/{len(schedule.stages)}: {'+'.join(stage.groups)} for {stage.epochs} epoch(s), trainable {sum(counts.values()):,} params {counts}")
                if ckpt is not None and s == ckpt["position"].stage:
                    load_optimizer_state(model, optimizer, ckpt["optimizer"])

            t0 = time.perf_counter()
            lr = lr_at(pos.step, total, args.lr, args.warmup)
            batches = [schedule.batch(s, epoch, b) for b in micro]
            micro_batches = [([examples[i] for i in idx], None if ref_table is None else ref_table[idx]) for idx in batches]
            row, n_tok = optimizer_step(model, optimizer, trainable, micro_batches, lr, objective, batching, precision, args.grad_clip, run.world)
            pos = Position(s, epoch, micro.stop, pos.step + 1)
            run.record({**row, "step": pos.step, "stage": s, "epoch": epoch, "lr": lr, "tokens": n_tok, "tokens_per_s": n_tok / (time.perf_counter() - t0)})
            if args.save_every and pos.step % args.save_every == 0:
                save()
        if optimizer is not None:
            save()  # inside run.steps(): a signal during the last save waits for it, as during any other
    run.exit_if_stopped(pos.step)
    return trained


def add_lora(model, stages, args) -> None:
    """LoRA adapters on the linear modules of every stage's groups (the base weights stay frozen)."""
    from clo.model.lora import apply_lora

    targets = lora_targets(sorted({g for s in stages for g in s.groups}))
    apply_lora(model, targets=targets, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    model.to(model.embed_tokens.weight.device)


def check_processes(args, world: World) -> None:
    """What N processes need: at least one example each per micro-batch; at most 4 length groups
    (each example's four sequences fill them, so every process runs the same forward passes)."""
    check_batch(args.batch_size, world)
    if world.size > 1 and args.length_groups > 4:
        raise CloError(f"--length-groups {args.length_groups}: at most 4 under torchrun")


def gathered_model(model, folder: Path, stages, args, world: World):
    """A whole, unsharded copy of a sharded model on process 0's CPU (None on the others), to save."""
    whole = None
    if world.main:
        whole = load_model(folder, "cpu", torch.float32)
        if args.lora:
            add_lora(whole, stages, args)
    gather_into(model, whole)  # every process takes part, one tensor at a time
    return whole


def reference_table(model, examples, batching: Batching, precision, model_id: str, args, world: World) -> torch.Tensor:
    """log π_ref [N, 4] of the starting model (adapters off), from the cache or computed and cached."""
    key = cache_key(model_id, str(precision), examples, batching=f"batch {args.batch_size}, {batching.describe()}")
    adapters_off = nullcontext()
    if args.lora:
        from clo.model.lora import disable_adapters

        adapters_off = disable_adapters(model)
    with adapters_off:
        table, hit = cached_reference_logps(
            cache_dir() / "reference", key,
            lambda: compute_reference_logps(model, examples, batching, args.batch_size, precision.autocast, world),
            rows=len(examples), recompute=args.recompute_reference, world=world,
        )  # fmt: skip
    if world.main:
        print(f"reference log-probs: {'cached' if hit else 'computed'} ({key})", file=sys.stderr)
    return table


def save_outputs(model, folder: Path, trained: set[str], out: Path, chat_format: str, args) -> None:
    """The HF folder <out>/model in the checkpoint's own dtype (and <out>/adapter with --lora).
    Weights that never trained first get the checkpoint's values back (they may be held in bf16)."""
    model.eval()
    restore_originals(model, folder, [n for n, _ in model.named_parameters() if n not in trained])
    if args.lora:
        from clo.model.lora import merge_lora, save_adapter

        save_adapter(model, out / "adapter", base_model=str(args.model))
        print(f"adapter saved to {out / 'adapter'}", file=sys.stderr)
        if not args.save_merged:
            return
        merge_lora(model)
    save_model(model, out / "model", tokenizer_from=folder, dtype=checkpoint_dtype(model, folder), chat_format=chat_format)
    print(f"model saved to {out / 'model'}", file=sys.stderr)


def sft_then_dpo(args, world: World = World()) -> Path:
    """The paper's second baseline as one command: SFT into <out>/sft, then DPO from that model into <out>.

    The DPO phase's reference policy is the SFT model (as in the paper's SFT+DPO). --resume skips a
    finished SFT phase and resumes whichever phase was interrupted. <out>'s lock is held for both
    phases: another command on <out> must not rewrite <out>/sft while the DPO phase reads it.
    """
    out = Path(args.out or f"runs/sft-dpo-{target_language(args.lang).code}")
    phases = [("sft", args.model, out / "sft"), ("dpo", str(out / "sft" / "model"), out)]
    with output_lock(out) if world.main else nullcontext():
        for method, model, phase_out in phases:
            if method == "sft" and args.resume and (phase_out / "model" / "config.json").is_file():
                if world.main:
                    print(f"sft-dpo: SFT phase already finished in {phase_out}", file=sys.stderr)
                continue
            resume = args.resume and (phase_out / "checkpoint.pt").is_file()
            overwrite = args.overwrite or (args.resume and not resume)  # nothing saved yet: the files are this command's own
            if world.main:
                print(f"sft-dpo: {method} phase -> {phase_out}", file=sys.stderr)
            merged = args.save_merged or (method == "sft" and args.lora)  # the DPO phase starts from a whole model
            phase = argparse.Namespace(**{**vars(args), "method": method, "model": model, "out": str(phase_out), "resume": resume,
                                          "overwrite": overwrite, "save_merged": merged})
            train(phase, world, locked=method == "dpo")
    return out


# --- validation and the run's identity -----------------------------------------------------------

def check_args(args) -> None:
    """Every numeric flag's range, before any work: one line naming the flag and its value."""
    if args.lr == "auto":
        args.lr = default_lr(args.model, DEFAULT_MODEL)
    elif isinstance(args.lr, str):
        try:
            args.lr = float(args.lr)
        except ValueError:
            raise CloError(f"--lr {args.lr!r}: must be a number or auto") from None
    finite = math.isfinite
    rules = {
        "batch_size": (args.batch_size >= 1, "at least 1"),
        "grad_accum": (args.grad_accum >= 1, "at least 1"),
        "lr": (finite(args.lr) and args.lr >= 0, "0 or more"),
        "warmup": (0 <= args.warmup <= 1, "a fraction in [0, 1]"),
        "weight_decay": (finite(args.weight_decay) and args.weight_decay >= 0, "0 or more"),
        "grad_clip": (finite(args.grad_clip) and args.grad_clip >= 0, "0 (off) or more"),
        "lam": (0 <= args.lam <= 1, "in [0, 1]"),
        "beta": (finite(args.beta) and args.beta > 0, "a positive number"),
        "max_length": (args.max_length >= 2, "at least 2"),
        "max_examples": (args.max_examples >= 0, "0 (all) or more"),
        "max_steps": (args.max_steps >= 0, "0 (all) or more"),
        "bucket": (args.bucket >= 0, "0 (auto) or more"),
        "length_groups": (args.length_groups >= 0, "0 (auto) or more"),
        "save_every": (args.save_every >= 0, "0 (only at the end) or more"),
        "show_answers": (args.show_answers >= 0, "0 (off) or more"),
        "lora_r": (args.lora_r >= 1, "at least 1"),
        "lora_alpha": (finite(args.lora_alpha) and args.lora_alpha > 0, "a positive number"),
        "lora_dropout": (0 <= args.lora_dropout < 1, "in [0, 1)"),
    }
    for name, (ok, wanted) in rules.items():
        if not ok:
            raise CloError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: must be {wanted}")
    check_precision_flags(args.dtype, args.amp)
    if args.lr == 0:
        print("warning: --lr 0: the weights will not change (a dry run of the pipeline)", file=sys.stderr)
    if args.resume and args.overwrite:
        raise CloError("--resume and --overwrite: choose one (continue the run in --out, or replace it)")


COMPUTE_FLAGS = ("method", "lang", "sft_on", "lam", "beta", "directions", "stages", "lr", "warmup", "weight_decay",
                 "grad_clip", "batch_size", "grad_accum", "max_length", "max_examples", "bucket", "length_groups", "packing", "seed", "lora")
LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout")
SETTING_FLAGS = {
    **{k: "--" + k.replace("_", "-") for k in COMPUTE_FLAGS + LORA_FLAGS},
    "chat_format": "--chat-format",
    "precision": "precision (--dtype/--amp: frozen weights/autocast)",
    "model": "--model (a hash of its weights)",
    "data": "--data (a hash of its token ids)",
    "processes": "the number of processes (torchrun --nproc-per-node x --nnodes)",
}


def run_settings(args, batching: Batching, fmt, precision, model_id: str, data_id: str, processes: int = 1) -> dict:
    """Every setting that changes what a run computes, saved in checkpoints and compared on --resume.

    Free to change on a resume: --max-steps (it only says where to stop; the schedule follows the
    stages), --save-every, --save-merged, and how a step runs rather than what it computes:
    --compile, --attention, --checkpoint-activations, --device (a device that changes the precision is refused
    through `precision`). --bucket, --length-groups and --packing count as resolved (0 and auto are resolved first).
    """
    settings = {k: getattr(args, k) for k in COMPUTE_FLAGS + (LORA_FLAGS if args.lora else ())}
    settings.update(bucket=batching.bucket, length_groups=batching.groups, packing=batching.packing)
    settings.update(chat_format=f"{fmt.name}, system {fmt.system!r}", precision=str(precision), model=model_id, data=data_id, processes=processes)
    return settings


if __name__ == "__main__":
    run_cli(main)
