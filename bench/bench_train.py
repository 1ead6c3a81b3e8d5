"""Training-step speed and memory: clo's CLO step vs TRL's DPOTrainer on the same tokens.

    python bench/bench_train.py                  # CPU table on SmolLM2-135M-Instruct (about 10 min on 2 cores)
    python bench/bench_train.py --device cuda    # Llama-2-7B shape, random bf16 weights, sequence 1024, MFU
    python bench/bench_train.py --lengths 128 --batch-sizes 1 --warmup 1 --rounds 1 --steps 1   # a quick look

One step on both sides: B examples = 4B sequences (clo/train/batching.py: x_en→y_en, x_en→y_t, x_t→y_t,
x_t→y_en), forward, backward, gradient clipping, AdamW over the attention projections only.

- clo: the step of train.py itself (`train.batch_loss`, its collate and loss; its autocast, dtype and
  compile policy from `--amp/--dtype/--compile auto`), timed from collate to `zero_grad`.
- TRL: `DPOTrainer` with `loss_type=["sigmoid", "sft"]`, `loss_weights=[1-λ, λ]`, reference
  log-probs precomputed, only q/k/v/o trainable (requires_grad set by hand, no PEFT), the same
  weights. Each example is two preference pairs (x_en: y_en ≻ y_t, x_t: y_t ≻ y_en), fed as the very
  token ids clo uses, so each TRL batch of 2B pairs is the same [4B, T] tokens. Timed between
  consecutive `on_step_end` callbacks inside `trainer.train()`: its fetch, collate, step and logging.

Work: each demo example's responses are tiled (or cut) by one common factor until its longest
sequence is exactly the sequence length, so the four lengths keep their natural ratios and the
batch keeps its natural padding. tokens/s counts the non-padding tokens of all four sequences.
Reference log-probs are computed before timing, on both sides.

Each side runs in its own worker process, so its memory is its own: peak RSS (VmHWM, reset just
before the first step; the interpreter and imported libraries included) on CPU,
`torch.cuda.max_memory_allocated` (reset likewise) on CUDA; the JSON also has the memory in use at
the reset (`baseline_bytes`: weights, libraries, no optimizer state yet). On CPU the parent alternates the
workers round by round (clo, TRL, clo, TRL, ...) after each has warmed up; tokens/s is the median
over all timed steps. On CUDA the two run one after the other (a 7B pair does not fit one card).
MFU = the step's FLOPs (`step_flops`) / time / this device's measured matmul rate in the compute
dtype (`matmul_rate`). Results go to a markdown table and a JSON file.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clo.train.batching import EncodedExample, count_tokens, encode_all  # noqa: E402
from clo.errors import CloError, run_cli  # noqa: E402
from clo.model.decoder import ATTENTION_PROJECTIONS  # noqa: E402

# Shapes for `--model random:<name>`: random weights built in memory, no files, no download.
RANDOM_SHAPES = {
    "llama2-7b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "tiny": dict(  # for the smoke test
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
}
SIDES = ("clo", "trl")


# --- work: the same token ids for both sides ---------------------------------------------------


def stretch(ex: EncodedExample, length: int) -> EncodedExample:
    """`ex` with every response body tiled (or cut) by one common factor, so its longest sequence is `length`.

    Prompts and each response's final end-of-turn token are kept; the four sequences keep their
    length ratios, so a batch of stretched examples has the padding real data of that length has.
    """
    bodies = [(prompt, response[:-1]) for prompt, response in ex.sequences]
    room = [length - 1 - len(prompt) for prompt, _ in bodies]
    if min(room) < 1 or any(not body for _, body in bodies):
        raise CloError(f"--lengths: {length} tokens leave no room for the responses of example {ex.id}")
    scale = min(r / len(body) for r, (_, body) in zip(room, bodies))
    sequences = []
    for r, (prompt, body), (_, response) in zip(room, bodies, ex.sequences):
        n = max(1, min(r, int(len(body) * scale + 1e-9)))
        tiled = (body * (n // len(body) + 1))[:n]
        sequences.append((prompt, tiled + response[-1:]))
    return EncodedExample(ex.id, sequences)


def bench_batches(spec: dict) -> tuple[list[list[EncodedExample]], int]:
    """(spec["n_batches"] batches of spec["batch"] stretched demo examples, pad id), ids within the model's vocab."""
    from clo.model.chat import detect_format
    from clo.pairs import demo_path, load_pairs
    from clo.model.tokenizer import load_tokenizer

    tok = load_tokenizer(spec["tokenizer"])
    fmt = detect_format(tok)
    need = spec["batch"] * spec["n_batches"]
    pairs = load_pairs(demo_path(spec["lang"]), spec["lang"]).examples
    if need > len(pairs):
        raise CloError(f"--batch-sizes x --steps: {need} examples needed, the demo set has {len(pairs)}")
    examples, _ = encode_all(tok, fmt, pairs[:need], max_length=10**9)
    vocab = spec["vocab_size"]  # a random-shape model may have a smaller vocabulary than the tokenizer
    examples = [
        EncodedExample(e.id, [([t % vocab for t in p], [t % vocab for t in r]) for p, r in stretch(e, spec["length"]).sequences])
        for e in examples
    ]
    B = spec["batch"]
    return [examples[i : i + B] for i in range(0, need, B)], tok.pad_id % vocab


def model_config(spec: dict) -> dict:
    """The HF config.json dict of the benchmarked model."""
    if spec["model"].startswith("random:"):
        return dict(RANDOM_SHAPES[spec["model"].removeprefix("random:")])
    return json.loads((Path(spec["model"]) / "config.json").read_text())


# --- FLOPs and the hardware's matmul rate ------------------------------------------------------


def step_flops(cfg, batch: list[EncodedExample]) -> float:
    """FLOPs one training step needs for `batch` (padding excluded), with only q/k/v/o trainable.

    Per token of a sequence of n tokens: forward 2N, activation gradients 2N, weight gradients 2N_t,
    where N counts the decoder's matmul weights (7 per layer) and N_t the trainable ones (q, k, v, o);
    the head (V x D) counts 4·V·D per response token only (forward + activation gradient: it is
    frozen, and both sides project only what the loss reads). Attention scores and values: 4·n·d per
    layer per token forward, twice that backward (d = heads x head_dim), counted for the full n x n
    square like PaLM's MFU, not the causal half. cfg: a clo ModelConfig.
    """
    D, hd, L = cfg.dim, cfg.head_dim, cfg.n_layers
    attn = D * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    N = L * (attn + 3 * D * cfg.ffn_dim)
    N_t = L * attn
    d = cfg.n_heads * hd
    total = 0.0
    for ex in batch:
        for prompt, response in ex.sequences:
            n = len(prompt) + len(response)
            total += n * (4 * N + 2 * N_t) + 12 * L * n * n * d + 4 * cfg.vocab_size * D * len(response)
    return total


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the peak the MFU is measured against."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda" and runs % 10:
            continue
        sync(device)
    sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- models -----------------------------------------------------------------------------------


def random_init_(named_params, seed: int = 0) -> None:
    """Fill parameters, named by their HF checkpoint keys, with N(0, 0.02) (norms: 1), one generator per name.

    Both sides call this with the same names, so both hold the same weights without any file.
    """
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator(p.device).manual_seed(seed + zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(0.02))


def clo_model(spec: dict, device: torch.device, dtype: torch.dtype | None):
    """clo's Transformer: loaded from the HF folder, or random in the shape of `random:<name>`."""
    from clo.model.hf_folder import hf_key, load_model

    from clo.runtime import default_dtype

    if not spec["model"].startswith("random:"):
        return load_model(Path(spec["model"]), device, dtype)
    from clo.model.config import ModelConfig
    from clo.model.decoder import Transformer, rope_inv_freq

    cfg = ModelConfig.from_hf(model_config(spec), source=spec["model"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default_dtype(device))
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    random_init_((hf_key(n), p) for n, p in model.named_parameters())
    return model.eval()


def hf_model(spec: dict, device: torch.device, dtype: torch.dtype):
    """The transformers model with the same weights as `clo_model` (SDPA attention)."""
    import transformers

    if not spec["model"].startswith("random:"):
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
        return model.to(device)
    config = transformers.LlamaConfig(**model_config(spec))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    random_init_(model.named_parameters())
    return model


# --- workers: one process per side, driven over a pipe ------------------------------------------


def rss_reset() -> bool:
    """Reset this process's RSS high-water mark (Linux: /proc/self/clear_refs "5"); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max_memory_allocated, or this process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "RSS high-water (VmHWM)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"  # KiB on Linux


def current_memory(device: torch.device) -> int:
    """Bytes in use now: CUDA memory_allocated, or this process's RSS (VmRSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


def start_peak(device: torch.device) -> dict:
    """Begin the measured stretch: reset the peak counter; returns what the peak covers and the memory in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        covers = "timed steps"
    else:
        covers = "timed steps" if rss_reset() else "whole worker process"
    return {"peak_covers": covers, "baseline_bytes": current_memory(device)}


def worker(side: str, conn, spec: dict) -> None:
    """Process entry point: set up `side`, answer ("run", n) with n steps' times, ("stop",) with peak memory."""
    sys.stdout = sys.stderr  # stdout belongs to the parent's table (Trainer prints its logs there)
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        (clo_worker if side == "clo" else trl_worker)(conn, spec)
    except BaseException as e:  # the parent prints it in the table instead of hanging on a dead pipe
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        conn.send({"error": "out of memory" if oom else f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    finally:
        conn.close()


def clo_worker(conn, spec: dict) -> None:
    """The step of train.py, on train.py's own defaults for this batch size and length."""
    import train
    from clo.train.reference import compute_reference_logps

    t0 = time.perf_counter()
    args = train.parse_args(["--lang", spec["lang"], "--batch-size", str(spec["batch"]), "--max-length", str(spec["length"]), "--device", spec["device"],
                             *spec["clo_flags"]])
    device, dtype, autocast_dtype, use_compile = train.runtime(args)  # train.py's precision and compile policy
    batches, pad_id = bench_batches(spec)
    model = clo_model(spec, device, dtype)  # --dtype auto: frozen weights in bf16 when autocast is on
    examples = [ex for batch in batches for ex in batch]
    ref_table = compute_reference_logps(model, examples, pad_id, args.batch_size, args.bucket, autocast_dtype)
    optimizer, trainable, _ = train.begin_stage(model, ("attn",), args, device, use_compile)
    conn.send({"ready": True, "setup_s": time.perf_counter() - t0, "amp": autocast_dtype is not None, "compile": use_compile})

    B, step, measured = args.batch_size, 0, None
    while (command := conn.recv())[0] == "run":
        measured = measured or start_peak(device)
        times = []
        for _ in range(command[1]):
            j = step % len(batches)
            sync(device)
            t = time.perf_counter()
            lr = train.lr_at(step, 10**6, args.lr, args.warmup)
            train.optimizer_step(model, optimizer, trainable, [(batches[j], ref_table[j * B : (j + 1) * B])], lr, args, pad_id, device, autocast_dtype)
            sync(device)
            times.append(time.perf_counter() - t)
            step += 1
        conn.send({"step_s": times})
    peak, kind = peak_memory(device)
    conn.send({"peak_bytes": peak, "peak_kind": kind, **(measured or {})})


def trl_worker(conn, spec: dict) -> None:
    """TRL's DPOTrainer as the closest equivalent of the clo step (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        os.environ["HF_DATASETS_CACHE"] = tmp  # TRL caches the reference log-probs here; never reuse a stale one
        trl_steps(conn, spec, tmp)


def trl_steps(conn, spec: dict, tmp: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames; not ours to fix
    import datasets
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl.trainer import dpo_trainer

    import train

    t0 = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device(spec["device"])
    args = train.parse_args(["--lang", spec["lang"], "--batch-size", str(spec["batch"]), "--device", spec["device"], *spec["clo_flags"]])
    _, dtype, autocast_dtype, _ = train.runtime(args)  # the same precision policy as the clo side
    use_amp = autocast_dtype is not None
    batches, pad_id = bench_batches(spec)
    B = spec["batch"]

    # Each example is two preference pairs; the batch [en pairs | t pairs] holds the example's four sequences.
    rows = []
    for batch in batches:
        for chosen, rejected in ((0, 1), (2, 3)):
            for ex in batch:
                (prompt, y_w), (_, y_l) = ex.sequences[chosen], ex.sequences[rejected]
                rows.append({"prompt_ids": prompt, "chosen_ids": y_w, "rejected_ids": y_l})
    dataset = datasets.Dataset.from_list(rows)

    model = hf_model(spec, device, dtype)  # same weights and dtype as clo's frozen ones
    for name, p in model.named_parameters():
        p.requires_grad_(any(f"self_attn.{m}." in name for m in ATTENTION_PROJECTIONS))
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights, as clo; bf16 compute comes from autocast
    if spec["model"].startswith("random:"):
        # TRL keys its reference cache by a sha256 of every weight (a minute for 7B); random weights need no key
        dpo_trainer.hash_module = lambda module: f"random-{time.time_ns()}"

    class TokensSeen(dpo_trainer.DataCollatorForPreference):
        """TRL's own collator, also recording the non-padding tokens of every batch it builds (a check)."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            collated.append(int(out["attention_mask"].sum()))
            return out

    class Pretokenized(trl.DPOTrainer):
        """DPOTrainer fed clo's token ids as they are: only its text tokenization is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class Rounds(TrainerCallback):
        """Times each optimizer step (on_step_end to on_step_end) and hands control to the parent between rounds."""

        def __init__(self):
            self.left, self.times, self.measured = 0, [], None

        def next_command(self, control):
            command = conn.recv()
            if command[0] == "stop":
                control.should_training_stop = True
            else:
                self.measured = self.measured or start_peak(device)
                self.left, self.times = command[1], []
            self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            collated.clear()  # drop the reference precompute's batches
            self.next_command(control)

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last, self.left = now, self.left - 1
            if self.left == 0:
                conn.send({"step_s": self.times})
                self.next_command(control)

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = trl.DPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=2 * B,  # 2B pairs = the 4B sequences of B examples
        gradient_accumulation_steps=1,
        max_steps=10**6,  # the parent stops it
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip,
        lr_scheduler_type="linear",
        beta=args.beta,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1 - args.lam, args.lam],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2 * B,
        max_length=None,  # the ids are already the right length; never truncate
        gradient_checkpointing=spec["trl_gradient_checkpointing"],  # TRL's default is on; clo's is off
        bf16=use_amp,  # the same autocast policy as clo's --amp auto
        use_cpu=device.type == "cpu",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        train_sampling_strategy="sequential",  # batch j = clo's batch j
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    collated = []
    collator = TokensSeen(pad_token_id=pad_id, max_length=None)
    trainer = Pretokenized(model=model, args=config, data_collator=collator, train_dataset=dataset, processing_class=tokenizer)
    amp = trainer.accelerator.mixed_precision == "bf16"  # what the Trainer really does, not what was asked
    conn.send({"ready": True, "setup_s": time.perf_counter() - t0, "amp": amp, "compile": False,
               "versions": {"trl": trl.__version__, "transformers": transformers.__version__}})
    rounds = Rounds()
    trainer.add_callback(rounds)
    trainer.train()
    peak, kind = peak_memory(device)
    conn.send({"peak_bytes": peak, "peak_kind": kind, **(rounds.measured or {}), "collated_tokens": collated[: len(batches)]})


# --- the parent: start the workers, alternate them, tabulate -----------------------------------


class Side:
    """One worker process, its step counter and its timings."""

    def __init__(self, name: str, spec: dict):
        ctx = mp.get_context("spawn")  # a fresh interpreter: its memory is its own
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(name, child, spec), daemon=True)
        self.process.start()
        child.close()
        self.info, self.times, self.batches, self.step, self.error = {}, [], [], 0, None

    def ask(self, *command) -> dict | None:
        """Send a command (none: just read the next message); None once the worker has failed."""
        if self.error:
            return None
        try:
            if command:
                self.conn.send(command)
            reply = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            reply = {"error": f"worker died (exit code {self.process.exitcode})"}
        if "error" in reply:
            self.error = reply["error"]
            print(f"{self.name}: {reply['error']}\n{reply.get('trace', '')}", file=sys.stderr)
            return None
        return reply

    def ready(self) -> None:
        self.info.update(self.ask() or {})

    def run(self, steps: int, n_batches: int, keep: bool) -> None:
        """`steps` steps; both sides take batch (step mod n_batches), so step k is the same work on both."""
        if steps == 0:
            return
        reply = self.ask("run", steps)
        if reply and keep:
            self.times += reply["step_s"]
            self.batches += [(self.step + i) % n_batches for i in range(steps)]
        self.step += steps

    def finish(self) -> None:
        self.info.update(self.ask("stop") or {})
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def measure(spec: dict, args) -> dict:
    """Both sides on one (length, batch) setting: warm-up, then `rounds` rounds of `steps` steps each."""
    from clo.model.config import ModelConfig

    batches, _ = bench_batches(spec)
    cfg = ModelConfig.from_hf(model_config(spec))
    tokens = [count_tokens(batch) for batch in batches]
    flops = [step_flops(cfg, batch) for batch in batches]
    n = len(batches)
    alternate = args.alternate == "on" or (args.alternate == "auto" and spec["device"] == "cpu")
    order = [s for s in SIDES if s in args.sides]
    sides = {}
    if alternate:
        for name in order:  # set up side by side (untimed), then time them one at a time
            sides[name] = Side(name, spec)
        for name in order:
            sides[name].ready()
        for name in order:
            sides[name].run(args.warmup, n, keep=False)
        for _ in range(args.rounds):
            for name in order:
                sides[name].run(args.steps, n, keep=True)
        for name in order:
            sides[name].finish()
    else:
        for name in order:
            sides[name] = Side(name, spec)
            sides[name].ready()
            sides[name].run(args.warmup, n, keep=False)
            for _ in range(args.rounds):
                sides[name].run(args.steps, n, keep=True)
            sides[name].finish()

    row = {"length": spec["length"], "batch": spec["batch"], "alternated": alternate,
           "tokens_per_step": statistics.median(tokens),
           "padded_length": max(len(p) + len(r) for batch in batches for ex in batch for p, r in ex.sequences),
           "step_gflops": statistics.median(flops) / 1e9}
    for name, side in sides.items():
        r = {"error": side.error} if side.error else {}
        if side.times:
            r.update(tokens_per_s=statistics.median(tokens[j] / t for j, t in zip(side.batches, side.times)),
                     mfu=statistics.median(flops[j] / t / args.matmul_flops for j, t in zip(side.batches, side.times)),
                     step_s=statistics.median(side.times), timed_steps=len(side.times), all_step_s=side.times)
        for key in ("peak_bytes", "peak_kind", "peak_covers", "baseline_bytes", "setup_s", "amp", "compile", "versions"):
            if key in side.info:
                r[key] = side.info[key]
        row[name] = r
    if "trl" in sides and "collated_tokens" in sides["trl"].info:
        # TRL's collator counted the non-padding tokens of each batch it built: they must be clo's counts
        row["same_tokens"] = sides["trl"].info["collated_tokens"] == tokens
    return row


NOTES = [
    "NLL term: TRL's `sft` loss is the token mean over every chosen response (y_en|x_en and y_t|x_t); clo's is over "
    "y_t|x_t only (docs/paper.md, section Loss: L_SFT). The same tokens go through the model; only which log-probs enter the loss differs.",
    "DPO: TRL averages the sigmoid loss over the 2B pairs; clo averages each direction over B and takes the mean of the "
    "two: equal for a full batch.",
    "Padding and attention: clo pads to a multiple of 8 (64 when compiling) and runs SDPA with no mask (causal; right "
    "padding is never seen by a real token); TRL pads to the batch maximum and passes the attention mask, so SDPA gets "
    "a mask (on CUDA that rules out the flash kernel).",
    "Log-probs: clo projects only response positions through the head, chunked, fp32 log-softmax. TRL's fused LM head "
    "projects every position (prompt and padding too) when Triton is absent (CPU), only the response positions on CUDA "
    "with Triton, and also computes per-token entropy, mean logit and top-1 for its metrics.",
    "Host syncs: TRL reads about ten metrics with .item() every step; clo converts its metrics to float once per step, "
    "as train.py does for its log line.",
    "Precision: bf16 autocast on both sides whenever clo's --amp auto turns it on (CUDA, AMX CPUs); frozen weights "
    "held in bf16 then (train.py's --dtype auto), fp32 otherwise, on both; the trainable q/k/v/o are fp32 master "
    "weights on both.",
    "Optimizer: torch AdamW over q/k/v/o only on both (fused on CUDA), clip 1.0; TRL's Trainer adds its linear LR "
    "scheduler and logs every 10 steps; clo sets the LR as train.py does.",
    "Gradient checkpointing: off on both unless asked for (TRL's default is on: --trl-gradient-checkpointing; clo's "
    "--checkpoint-activations via --clo-flags). torch.compile: clo follows train.py (--compile auto: each block "
    "compiled on CUDA, none on CPU); TRL does not compile (its default).",
    "Timing: clo from collate to zero_grad; TRL from one on_step_end to the next, inside trainer.train() (its batch "
    "fetch and collate, step, scheduler and logging). Reference log-probs: precomputed by both before timing, untimed.",
]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict], sides: list[str]) -> str:
    """The markdown table: one row per (length, batch), both sides, and their ratios."""
    head = "| seq len | batch | tokens/step | " + " | ".join(f"{s} tok/s | {s} peak GiB | {s} MFU" for s in sides)
    if len(sides) == 2:
        head += " | speed-up | memory ratio | same tokens"
    lines = [head + " |", "|" + "---|" * head.count("|")]
    for row in rows:
        cells = [str(row["length"]), str(row["batch"]), "-" if row.get("tokens_per_step") is None else f"{row['tokens_per_step']:.0f}"]
        for s in sides:
            r = row.get(s, {})
            if "tokens_per_s" in r:
                cells += [f"{r['tokens_per_s']:.0f}", gib(r.get("peak_bytes")), f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"]
            else:
                cells += [r.get("error", "-"), gib(r.get("peak_bytes")), "-"]
        if len(sides) == 2:
            a, b = row.get(sides[0], {}), row.get(sides[1], {})
            speed = f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" if "tokens_per_s" in a and "tokens_per_s" in b else "-"
            mem = f"{a['peak_bytes'] / b['peak_bytes']:.2f}x" if a.get("peak_bytes") and b.get("peak_bytes") else "-"
            cells += [speed, mem, {True: "yes", False: "NO"}.get(row.get("same_tokens"), "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", help="HF folder, the default model's name, or random:<shape> (shapes: "
                   f"{', '.join(RANDOM_SHAPES)}); default: smollm2-135m-instruct on CPU, random:llama2-7b on CUDA")
    p.add_argument("--tokenizer", help="folder whose tokenizer encodes the demo data (default: the model's, else the default model's)")
    p.add_argument("--lang", default="sw", help="demo set whose examples are stretched to each length")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths at the first batch size (default CPU: 128 256 512; CUDA: 1024)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="examples per step (x4 sequences); the first is used for the length "
                   "sweep, the others at the middle length (default CPU: 1 2 4; CUDA: 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side, alternating on CPU")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round; also the number of distinct batches")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES, help="which implementations to run")
    p.add_argument("--alternate", choices=["auto", "on", "off"], default="auto", help="alternate the sides round by round, "
                   "both workers alive (auto: on for CPU; off for CUDA, where two 7B setups do not fit one card)")
    p.add_argument("--clo-flags", default="", help="extra train.py flags for the clo side, e.g. '--checkpoint-activations' or '--compile on'")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL with its default gradient checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--json", help="where the results go (default runs/bench/train-<device>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.warmup < 0 or args.rounds < 1 or args.steps < 1:
        raise CloError("--warmup must be >= 0, --rounds and --steps >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CloError("--device cuda: no CUDA device is visible")
    cuda = device.type == "cuda"
    args.model = args.model or ("random:llama2-7b" if cuda else "smollm2-135m-instruct")
    args.lengths = args.lengths or ([1024] if cuda else [128, 256, 512])
    args.batch_sizes = args.batch_sizes or ([1] if cuda else [1, 2, 4])
    from clo.runtime import bf16_is_fast
    from clo.model.sources import DEFAULT_MODEL, resolve_model

    if args.model.startswith("random:"):
        if args.model.removeprefix("random:") not in RANDOM_SHAPES:
            raise CloError(f"--model: unknown shape {args.model!r}; shapes: {', '.join(RANDOM_SHAPES)}")
        model = args.model
        tokenizer = str(resolve_model(args.tokenizer or DEFAULT_MODEL))
    else:
        model = str(resolve_model(args.model))
        tokenizer = str(resolve_model(args.tokenizer)) if args.tokenizer else model
    middle = sorted(args.lengths)[len(args.lengths) // 2]
    settings = [(length, args.batch_sizes[0]) for length in args.lengths]
    settings += [(middle, b) for b in args.batch_sizes[1:] if (middle, b) not in settings]

    # The peak the MFU is measured against: the compute dtype of the step (bf16 under autocast).
    compute_dtype = torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    args.matmul_flops = matmul_rate(device, compute_dtype)
    if cuda:
        torch.cuda.empty_cache()
    os.environ["TQDM_DISABLE"] = "1"  # the workers inherit it: no progress bars between the table rows
    info = {**machine(), "matmul_tflops": args.matmul_flops / 1e12, "matmul_dtype": str(compute_dtype).removeprefix("torch.")}
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info.get('gpu', 'no GPU')}; torch {torch.__version__}; "
          f"measured {info['matmul_dtype']} matmul {info['matmul_tflops']:.2f} TFLOP/s", file=sys.stderr)

    rows = []
    vocab = model_config({"model": model})["vocab_size"]  # random shapes: token ids are taken modulo this
    for length, batch in settings:
        spec = {"device": args.device, "model": model, "tokenizer": tokenizer, "lang": args.lang, "length": length,
                "batch": batch, "n_batches": args.steps, "vocab_size": vocab, "threads": args.threads,
                "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "clo_flags": args.clo_flags.split()}
        t = time.perf_counter()
        rows.append(measure(spec, args))
        print(f"seq {length} batch {batch}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        print(table(rows[-1:], args.sides).splitlines()[-1], file=sys.stderr)

    sides = [s for s in SIDES if s in args.sides]
    versions = next((r["trl"]["versions"] for r in rows if "versions" in r.get("trl", {})), {})
    title = (f"{Path(model).name if not model.startswith('random:') else model}, {args.device}, "
             f"warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps per side"
             f"{', clo flags ' + repr(args.clo_flags) if args.clo_flags else ''}"
             f"{', alternating' if rows and rows[0]['alternated'] else ''}; torch {torch.__version__}"
             + "".join(f", {k} {v}" for k, v in versions.items()))
    peak = next((r[s]["peak_kind"] + " over " + str(r[s].get("peak_covers")) for r in rows for s in sides if "peak_kind" in r.get(s, {})), "")
    print(f"\n{title}\nmachine: {info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if 'gpu' in info else ''}; "
          f"MFU against the measured {info['matmul_dtype']} matmul rate {info['matmul_tflops']:.2f} TFLOP/s; peak: {peak}\n")
    print(table(rows, sides))
    if "trl" in sides:
        print("\nDifferences that remain between the two sides:")
        for note in NOTES:
            print(f"- {note}")
    out = Path(args.json or REPO / "runs" / "bench" / f"train-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"title": title, "machine": info, "settings": vars(args) | {"model": model}, "rows": rows,
                               "notes": NOTES if "trl" in sides else []}, indent=2, default=str))
    os.replace(tmp, out)
    print(f"\nresults: {out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_cli(main)
