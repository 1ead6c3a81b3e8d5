"""Train a model to answer in the prompt's language with Cross-Lingual Optimization (arXiv 2505.14297).

    python train.py --lang sw                        # CLO on the demo set, default model, CPU or GPU
    python train.py --lang sw --method sft           # baseline: SFT on the target-language pairs
    python train.py --lang sw --method sft-dpo       # baseline: SFT, then DPO from the SFT model

Reads top to bottom like the method: data -> four sequences per example -> reference log-probs
(once, cached) -> stages of training with the CLO loss -> an HF-format model folder.

    L_CLO = λ·NLL(y_t | x_t) + (1−λ)·L_CL      (docs/paper.md "Loss"; clo/loss.py)

Features: stages of parameter groups (`--stages attn:1,all:1`), optional LoRA, AdamW with fp32
master weights and bf16 autocast on CUDA, linear warmup/decay, gradient accumulation and clipping,
torch.compile of each block on CUDA, optional activation checkpointing, metrics as JSONL, atomic
checkpoints with exact `--resume` (refused when a setting that changes the computation differs),
Ctrl-C / SIGTERM save between steps, one run per --out (a lock), the SFT+DPO baseline as one command.
Limitations: one device (no multi-GPU); single-turn examples only; examples longer than
--max-length are dropped, not cut; the NLL is a token mean per micro-batch.
"""

import argparse
import functools
import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clo.atomic import leftovers, write_atomic
from clo.batching import count_tokens, encode_all, flat_sequences
from clo.chat import detect_format
from clo.checkpoint import bf16_is_fast, load_model, on_for_cuda, restore_originals, save_model
from clo.data import demo_path, load_pairs
from clo.default_model import DEFAULT_MODEL, cache_dir, resolve_model
from clo.device import resolve_device
from clo.errors import ArgumentParser, CloError, run_cli
from clo.freeze import lora_targets, parse_stages, set_trainable
from clo.interrupt import stop_requests
from clo.languages import get_language
from clo.lock import output_lock
from clo.forward import sequence_logps
from clo.loss import FourWay, clo_loss, dpo_only_loss, token_mean_nll
from clo.reference import cache_key, cached_reference_logps, compute_reference_logps, data_digest, model_fingerprint
from clo.tokenizer import load_tokenizer
from clo.train_checkpoint import Position, read_checkpoint, resume_from, save_checkpoint, set_rng_state

SFT_SEQUENCES = {"target": [2], "english": [0], "both": [0, 2]}  # indices into clo/batching.py's four


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
    p.add_argument("--lr", type=float, default=8e-6, help="peak learning rate (paper recipe: 8e-6)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (each is 4 sequences)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="longest sequence in tokens; longer examples are dropped")
    p.add_argument("--bucket", type=int, default=0, help="pad lengths to a multiple of this, so compiled shapes stay few (0: 64 when compiling, else 8)")
    p.add_argument("--length-groups", type=int, default=0, help="run each micro-batch's sequences as N length-sorted groups, each padded to its own longest: the same numbers from fewer padded tokens (0: auto, 4 on CPU, 1 on CUDA)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: run all stages); the schedule still follows the stages, so a later --resume may raise it")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and initialisation")
    p.add_argument("--out", help="output folder (default: runs/<method>-<lang>)")
    p.add_argument("--save-every", type=int, default=100, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt; every setting that changes the computation must match the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (without it, such an --out is refused)")
    p.add_argument("--recompute-reference", action="store_true", help="compute the reference log-probs again even if they are cached")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="dtype frozen weights are held in (auto: bf16 on CUDA, fp32 on CPU); bfloat16 needs bf16 autocast (not --amp off); saved weights are exact either way")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast for compute (auto: on for CUDA, for CPUs with AMX, where bf16 matmuls are ~8x faster, and with --dtype bfloat16; off: fp32 compute)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the decoder (auto: on for CUDA)")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute each block in backward: much less activation memory, ~1/3 more compute")
    p.add_argument("--chat-format", default="auto", help="auto, chatml, llama3, llama2, mistral or plain")
    p.add_argument("--save-merged", action="store_true", help="with --lora: also write merged full weights to <out>/model")
    return p.parse_args(argv)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then linear decay to 0."""
    warm = max(1, math.ceil(total * warmup))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


@functools.lru_cache(maxsize=1)  # called every step; the order changes once per epoch
def seeded_order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The data order of one epoch: a pure function of (seed, stage, epoch), so a resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_loss(model, batch, ref_rows, args, pad_id, device):
    """(loss, metrics) of one micro-batch for the chosen method."""
    which = SFT_SEQUENCES[args.sft_on] if args.method == "sft" else range(4)
    logps, n_tokens = sequence_logps(model, flat_sequences(batch, which), pad_id, args.bucket, args.length_groups)
    if args.method == "sft":
        nll = token_mean_nll(logps, n_tokens)
        return nll, {"loss": nll.detach(), "nll": nll.detach()}
    B = len(batch)
    logps, n_tokens = logps.view(4, B), n_tokens.view(4, B)
    policy, reference = FourWay(*logps), FourWay(*ref_rows.to(device).T)
    nll = token_mean_nll(logps[2], n_tokens[2])  # NLL(y_t | x_t): target-language responses only
    if args.method == "clo":
        return clo_loss(policy, reference, nll, beta=args.beta, lam=args.lam, directions=args.directions)
    return dpo_only_loss(policy, reference, beta=args.beta, directions=args.directions, nll=nll.detach())


def runtime(args):
    """(device, frozen-weight dtype, autocast dtype or None, compile?) from the flags.

    Frozen weights: bf16 on CUDA (with autocast), fp32 on CPU (`--dtype auto`). fp32 keeps the
    residual stream and the head in fp32 while the matmuls inside the blocks still run in bf16: in
    the default job the step-1 rewards (policy vs cached reference, equal weights) stay within
    ±0.0031, against ±0.047 with `--dtype bfloat16`, which trades that for ~0.45 GiB less memory
    (BENCHMARKS.md). `--dtype bfloat16` needs autocast (check_args refuses it with --amp off): without
    it a bf16 activation would meet an fp32 master weight. Either way the checkpoint file stays the master copy of frozen weights
    (clo.checkpoint.restore_originals): untrained weights are saved exactly as they were loaded.
    """
    device = resolve_device(args.device)
    # frozen weights held in bf16 need bf16 compute: --dtype bfloat16 turns auto autocast on everywhere
    use_amp = args.amp == "on" or (args.amp == "auto" and (bf16_is_fast(device) or args.dtype == "bfloat16"))
    auto = torch.bfloat16 if device.type == "cuda" and use_amp else torch.float32
    dtype = {"auto": auto, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    use_compile = on_for_cuda(args.compile, device)
    if use_compile:  # one graph per (batch, bucketed length) shape; allow more than dynamo's default 8
        torch._dynamo.config.recompile_limit = 64
    args.bucket = args.bucket or (64 if use_compile else 8)
    # CPU: a third of the demo's padded tokens were padding, and 4 groups cut a step by ~25% (BENCHMARKS.md);
    # CUDA: not yet measured there, so one padded tensor as before
    args.length_groups = args.length_groups or (1 if device.type == "cuda" else 4)
    return device, dtype, torch.bfloat16 if use_amp else None, use_compile


def begin_stage(model, groups, args, device, use_compile, source=None, trained=frozenset()):
    """Make `groups` trainable with fp32 master weights; a fresh AdamW over them. -> (optimizer, params, counts).

    source: the checkpoint folder; a weight that starts training here (not in `trained`, the names an
    earlier stage or the resumed checkpoint already trained) starts from its value there, exactly.
    """
    counts = set_trainable(model, groups, lora=args.lora)
    if source is not None:
        restore_originals(model, source, [n for n, p in model.named_parameters() if p.requires_grad and n not in trained])
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # bf16 compute comes from autocast; updates accumulate in fp32
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    if use_compile:
        compile_blocks(model)
    model.checkpoint_activations = args.checkpoint_activations
    model.train()
    return optimizer, trainable, counts


def compile_blocks(model) -> None:
    """torch.compile each decoder block in place, once (static shapes: one graph per bucketed length).

    Regional compilation: the blocks share their code, so one graph serves all of them and it builds
    in seconds; compiling `model.hidden` whole unrolls every layer (SmolLM2, CPU, cold caches: 100 s vs
    28 s to the first step, the same step time after: bench/bench_compile.py). Embedding, RoPE tables and the final norm stay eager.
    """
    for layer in model.layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=False)


def optimizer_step(model, optimizer, trainable, micro_batches, lr, args, pad_id, device, autocast_dtype):
    """One update over [(examples, reference rows), ...] micro-batches. -> (mean metrics incl. grad_norm, tokens)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_tok, parts = 0, []
    for batch, ref_rows in micro_batches:
        with torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss, metrics = batch_loss(model, batch, ref_rows, args, pad_id, device)
        (loss / len(micro_batches)).backward()
        n_tok += count_tokens(batch, SFT_SEQUENCES[args.sft_on] if args.method == "sft" else range(4))
        parts.append(metrics)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row = {k: sum(float(m[k]) for m in parts) / len(parts) for k in parts[0]}  # the one host sync per step
    return {**row, "grad_norm": float(grad_norm)}, n_tok


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    resolve_device(args.device)
    if args.method == "sft-dpo":
        return sft_then_dpo(args)
    return train(args)


def sft_then_dpo(args) -> Path:
    """The paper's second baseline as one command: SFT into <out>/sft, then DPO from that model into <out>.

    The DPO phase's reference policy is the SFT model (as in the paper's SFT+DPO). --resume skips a
    finished SFT phase and resumes whichever phase was interrupted.
    """
    out = Path(args.out or f"runs/sft-dpo-{get_language(args.lang).code}")
    phases = [("sft", args.model, out / "sft"), ("dpo", str(out / "sft" / "model"), out)]
    for method, model, phase_out in phases:
        if method == "sft" and args.resume and (phase_out / "model" / "config.json").is_file():
            print(f"sft-dpo: SFT phase already finished in {phase_out}", file=sys.stderr)
            continue
        resume = args.resume and (phase_out / "checkpoint.pt").is_file()
        overwrite = args.overwrite or (args.resume and not resume)  # nothing saved yet: the files are this command's own
        print(f"sft-dpo: {method} phase -> {phase_out}", file=sys.stderr)
        train(argparse.Namespace(**{**vars(args), "method": method, "model": model, "out": str(phase_out), "resume": resume, "overwrite": overwrite}))
    return out


def train(args) -> Path:
    """One training run (clo, sft or dpo) from validated flags. -> the output folder."""
    lang = get_language(args.lang)
    if lang.code == "en":
        raise CloError("--lang: the target language must not be English")
    stages = parse_stages(args.stages)
    device, dtype, autocast_dtype, use_compile = runtime(args)
    out = Path(args.out or f"runs/{args.method}-{lang.code}")
    check_out(out, args)
    checkpoint_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    with output_lock(out):  # one run per --out; taken first, so a second run stops at once
        removed = remove_leftovers(out)
        if removed:
            print(f"removed {len(removed)} temporary file(s) left in {out} by a killed run", file=sys.stderr)
        random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

        # 1. Data: validate every line before anything expensive, then four sequences per example.
        # (Nothing is printed before the last check: a bad input is one line on stderr.)
        data_path = Path(args.data) if args.data else demo_path(lang.code)
        report = load_pairs(data_path, lang.code)
        folder = resolve_model(args.model)
        tok = load_tokenizer(folder)
        fmt = detect_format(tok, args.chat_format)
        chosen = report.examples[: args.max_examples] if args.max_examples else report.examples
        examples, too_long = encode_all(tok, fmt, chosen, args.max_length)
        if not examples:
            raise CloError(f"{data_path}: every example is longer than --max-length {args.max_length}")

        # 2. Model. Frozen weights are held in --dtype (bf16 on CUDA); trainable ones get fp32 master copies per stage.
        saved = read_checkpoint(checkpoint_path) if args.resume else None
        model = load_model(folder, device, dtype)

        # Everything that decides what this run computes; a resume must match all of it.
        model_id = model_fingerprint(folder, memo=cache_dir() / "fingerprints.json")
        precision = f"{dtype}/{autocast_dtype}"
        settings = run_settings(args, fmt, precision, model_id, data_digest(examples))
        ckpt = resume_from(checkpoint_path, saved, settings, SETTING_FLAGS) if saved else None
        print(f"data: {data_path}: {report.summary()}, {too_long} longer than {args.max_length} tokens dropped; chat format {fmt.name}", file=sys.stderr)
        if args.lora:
            from clo.lora import apply_lora

            targets = lora_targets(sorted({g for s in stages for g in s.groups}))
            apply_lora(model, targets=targets, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
            model.to(device)

        # 3. Reference log-probs of the starting model, once, cached on disk (never a second model in memory).
        ref_table = None
        if args.method != "sft":
            key = cache_key(model_id, precision, examples, batching=f"batch {args.batch_size}, bucket {args.bucket}, groups {args.length_groups}")
            adapters_off = nullcontext()
            if args.lora:
                from clo.lora import disable_adapters

                adapters_off = disable_adapters(model)
            with adapters_off:
                ref_table, hit = cached_reference_logps(
                    cache_dir() / "reference", key,
                    lambda: compute_reference_logps(model, examples, tok.pad_id, args.batch_size, args.bucket, autocast_dtype, args.length_groups),
                    rows=len(examples), recompute=args.recompute_reference,
                )
            print(f"reference log-probs: {'cached' if hit else 'computed'} ({key})", file=sys.stderr)

        # 4. Where to resume from, and how long the run is.
        batches_per_epoch = math.ceil(len(examples) / args.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
        total_steps = sum(s.epochs for s in stages) * steps_per_epoch
        pos = Position()
        if ckpt is not None:
            pos = ckpt["position"]
            params = dict(model.named_parameters())
            for name, value in ckpt["weights"].items():
                params[name].data = value.to(device)  # keeps the saved dtype: fp32 master weights stay fp32
            set_rng_state(ckpt["rng"])  # nothing random happens between here and the next step
            keep_metrics_until(metrics_path, pos.step)
            print(f"resuming from {checkpoint_path} at step {pos.step}", file=sys.stderr)
        else:
            clear_run(out)  # only a run the user asked to --overwrite gets here with files in it
            out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({**vars(args), "model_folder": str(folder), "data": str(data_path), "chat_format": fmt.name, "examples": len(examples), "total_steps": total_steps}, indent=2))
        total_run = min(total_steps, args.max_steps) if args.max_steps else total_steps

        # 5. Train: every optimizer step from the resume position on; a new stage rebuilds the optimizer.
        trained: set[str] = set(ckpt["weights"]) if ckpt else set()
        bar = tqdm(total=total_run, initial=pos.step, desc=f"{args.method} {lang.code}", unit="step")
        optimizer, stage_idx = None, None

        def save():
            save_checkpoint(checkpoint_path, weights={n: p for n, p in model.named_parameters() if n in trained}, optimizer=optimizer, position=pos, settings=settings)

        # Ctrl-C / SIGTERM are read between steps, so an update is never saved without its position.
        with stop_requests() as stop:
            for s, epoch, micro in steps_from(Position(**vars(pos)), stages, batches_per_epoch, args.grad_accum):
                if (args.max_steps and pos.step >= args.max_steps) or stop.requested:
                    break
                if s != stage_idx:
                    stage_idx, stage = s, stages[s]
                    optimizer, trainable, counts = begin_stage(model, stage.groups, args, device, use_compile, folder, trained)
                    trained |= {n for n, p in model.named_parameters() if p.requires_grad}
                    bar.write(f"stage {s + 1}/{len(stages)}: {'+'.join(stage.groups)} for {stage.epochs} epoch(s), trainable {sum(counts.values()):,} params {counts}")
                    if ckpt is not None and s == ckpt["position"].stage:
                        optimizer.load_state_dict(ckpt["optimizer"])

                t0 = time.perf_counter()
                lr = lr_at(pos.step, total_steps, args.lr, args.warmup)
                order = seeded_order(len(examples), args.seed, s, epoch)
                micro_batches = []
                for b in micro:
                    idx = order[b * args.batch_size : (b + 1) * args.batch_size]
                    micro_batches.append(([examples[i] for i in idx], None if ref_table is None else ref_table[idx]))
                row, n_tok = optimizer_step(model, optimizer, trainable, micro_batches, lr, args, tok.pad_id, device, autocast_dtype)
                pos = Position(s, epoch, micro.stop, pos.step + 1)
                row.update(step=pos.step, stage=s, epoch=epoch, lr=lr, tokens=n_tok, tokens_per_s=n_tok / (time.perf_counter() - t0))
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.update(1)
                bar.set_postfix({"loss": f"{row['loss']:.3f}", **({"margin": f"{row['margin']:.3f}"} if "margin" in row else {}), "tok/s": f"{row['tokens_per_s']:.0f}"})
                if args.save_every and pos.step % args.save_every == 0:
                    save()
        bar.close()
        if optimizer is not None:
            save()
        if stop.requested:
            print(f"\ninterrupted: checkpoint saved to {checkpoint_path} at step {pos.step}; continue with --resume", file=sys.stderr)
            sys.exit(128 + stop.signum)

        report_summary(out, metrics_path, device)

        # 6. Outputs: an HF-format folder transformers loads (and PEFT adapters with --lora). Weights that
        # never trained go back to the checkpoint's own values first (they may be held in bf16).
        optimizer = None  # frees the AdamW state before the originals come back
        model.eval()
        restore_originals(model, folder, [n for n, _ in model.named_parameters() if n not in trained])
        save_dtype = getattr(torch, model.cfg.raw.get("torch_dtype") or model.cfg.raw.get("dtype") or "float32")  # the checkpoint's own
        if args.lora:
            from clo.lora import merge_lora, save_adapter

            save_adapter(model, out / "adapter", base_model=str(args.model))
            print(f"adapter saved to {out / 'adapter'}", file=sys.stderr)
            if not args.save_merged:
                return out
            merge_lora(model)
        save_model(model, out / "model", tokenizer_from=folder, dtype=save_dtype, chat_format=fmt.name)
        print(f"model saved to {out / 'model'}", file=sys.stderr)
    return out


# --- validation and the run's identity -----------------------------------------------------------

def check_args(args) -> None:
    """Every numeric flag's range, before any work: one line naming the flag and its value."""
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
        "lora_r": (args.lora_r >= 1, "at least 1"),
        "lora_alpha": (finite(args.lora_alpha) and args.lora_alpha > 0, "a positive number"),
        "lora_dropout": (0 <= args.lora_dropout < 1, "in [0, 1)"),
    }
    for name, (ok, wanted) in rules.items():
        if not ok:
            raise CloError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: must be {wanted}")
    if args.dtype == "bfloat16" and args.amp == "off":
        raise CloError("--dtype bfloat16 with --amp off: frozen bf16 weights meet the fp32 master copies only under "
                       "bf16 autocast; use --amp on (bf16 compute) or --dtype float32 (fp32 compute)")
    if args.lr == 0:
        print("warning: --lr 0: the weights will not change (a dry run of the pipeline)", file=sys.stderr)
    if args.resume and args.overwrite:
        raise CloError("--resume and --overwrite: choose one (continue the run in --out, or replace it)")


RUN_FILES = ("run.json", "metrics.jsonl", "checkpoint.pt", "model", "adapter")


def check_out(out: Path, args) -> None:
    """--out must be a folder that holds no other run, unless the user resumes or overwrites it."""
    if out.exists() and not out.is_dir():
        raise CloError(f"--out {out}: exists and is not a folder")
    if not args.resume and not args.overwrite:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held:
            raise CloError(f"--out {out}: holds a run ({held[0]}); --resume continues it, --overwrite replaces it, or choose another --out")


def clear_run(out: Path) -> None:
    """Remove an earlier run's files from `out` (called only for a fresh run; --overwrite asked for it)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary files and folders a killed save left in `out` (`.checkpoint.pt.XXXX`, `.model.XXXX/`, ...);
    called with the folder locked, so no other run can be writing them."""
    found = [p for name in ("checkpoint.pt", "metrics.jsonl", "model", "adapter") for p in leftovers(out / name)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


COMPUTE_FLAGS = ("method", "lang", "sft_on", "lam", "beta", "directions", "stages", "lr", "warmup", "weight_decay",
                 "grad_clip", "batch_size", "grad_accum", "max_length", "max_examples", "bucket", "length_groups", "seed", "lora")
LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout")
SETTING_FLAGS = {
    **{k: "--" + k.replace("_", "-") for k in COMPUTE_FLAGS + LORA_FLAGS},
    "chat_format": "--chat-format",
    "precision": "precision (--dtype/--amp: frozen weights/autocast)",
    "model": "--model (a hash of its weights)",
    "data": "--data (a hash of its token ids)",
}


def run_settings(args, fmt, precision: str, model_id: str, data_id: str) -> dict:
    """Every setting that changes what a run computes, saved in checkpoints and compared on --resume.

    Free to change on a resume: --max-steps (it only says where to stop; the schedule follows the
    stages), --save-every, --save-merged, and how a step runs rather than what it computes:
    --compile, --checkpoint-activations, --device (a device that changes the precision is refused
    through `precision`).
    """
    settings = {k: getattr(args, k) for k in COMPUTE_FLAGS + (LORA_FLAGS if args.lora else ())}
    settings.update(chat_format=f"{fmt.name}, system {fmt.system!r}", precision=precision, model=model_id, data=data_id)
    return settings


def steps_from(start: Position, stages, batches_per_epoch: int, grad_accum: int):
    """Every optimizer step from `start` on, as (stage, epoch, range of micro-batch indices in the epoch)."""
    for s in range(start.stage, len(stages)):
        for epoch in range(start.epoch if s == start.stage else 0, stages[s].epochs):
            first = start.batch if (s, epoch) == (start.stage, start.epoch) else 0
            for b0 in range(first, batches_per_epoch, grad_accum):
                yield s, epoch, range(b0, min(b0 + grad_accum, batches_per_epoch))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def report_summary(out: Path, metrics_path: Path, device: torch.device) -> None:
    """Median tokens/s, peak memory and first/last margin, printed and added to run.json."""
    rows = [json.loads(line) for line in metrics_path.read_text().split("\n") if line]
    if not rows:
        return
    summary = {
        "steps": len(rows),
        "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }
    if "margin" in rows[0]:
        summary.update(first_margin=rows[0]["margin"], last_margin=rows[-1]["margin"])
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "summary": summary}, indent=2))
    print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()), file=sys.stderr)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint's step (they will be written again), and a last line
    torn by a kill; any other line that is not a metrics row is a one-line error."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # after the last newline: empty, or a line torn mid-write
    kept = []
    for number, line in enumerate(complete, 1):
        try:
            row = json.loads(line)
            at = row["step"]
        except (ValueError, KeyError, TypeError):
            raise CloError(f"{path}:{number}: not a metrics line (field 'step' missing or invalid JSON)") from None
        if at <= step:
            kept.append(line)
    write_atomic(path, "".join(r + "\n" for r in kept))


if __name__ == "__main__":
    run_cli(main)
