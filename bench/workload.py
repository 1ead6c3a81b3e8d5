"""The training benchmark's work and its measures: what bench_train.py's sides compute, and how it is counted.

Work (`bench_batches`; every side gets these very token ids), one of two mixes:
- `stretched`: each demo example's responses are tiled (or cut) by one common factor until its
  longest sequence is exactly the sequence length (`stretch`), so the four lengths keep their
  natural ratios and a batch keeps its natural padding;
- `alpaca`: the 5,000 English Alpaca examples of ../shared/data (prompt = instruction + input), each
  with a target side of random tokens of the same lengths (speed depends on lengths, not on words),
  those whose longest sequence fits the length cap, in one shuffled order (`alpaca_examples`): a
  realistic spread of lengths, described by `describe`.
Both sides hold and compute in train.py's precision policy (`precision_policy`). Measures: the FLOPs one step needs (`step_flops`), the device's matmul rate the MFU is measured
against (`matmul_rate`), and the memory of a worker process (`start_peak`, `peak_memory`).
"""

import os
import random
import statistics
import time
from pathlib import Path

import torch
from common import REPO, sync

from clo.errors import CloError
from clo.train.batching import EncodedExample, encode_all
from clo.train.precision import Precision, training_precision

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


# ../shared/data, or where CLO_SHARED_DATA points (as for the tests; bench/gpu_check.sh points it into the checkout)
ALPACA = Path(os.environ.get("CLO_SHARED_DATA", REPO.parent / "shared" / "data")) / "alpaca" / "alpaca_5000.json"
MIXES = ("stretched", "alpaca")


def alpaca_examples(tok, fmt, max_length: int, seed: int = 0) -> list[EncodedExample]:
    """Alpaca's English prompts and answers (read as translate.py reads an Alpaca file: instruction and
    input joined, records with an empty field skipped), each with a random-token target side of the
    same lengths, in file order; those whose longest sequence is over `max_length` are left out."""
    from clo.model.chat import encode_prompt, encode_response
    from clo.translate.sft_sources import read_sft_source

    if not ALPACA.is_file():
        raise CloError(f"{ALPACA}: not found (the Alpaca 5k subset of ../shared/data, see its README; CLO_SHARED_DATA names another folder)")
    g = random.Random(seed)
    out = []
    for sft in read_sft_source(ALPACA, "alpaca").examples:
        x_en, y_en = encode_prompt(tok, fmt, sft.prompt), encode_response(tok, fmt, sft.response)
        x_t, y_t = [g.randrange(3, tok.vocab_size) for _ in x_en], [g.randrange(3, tok.vocab_size) for _ in y_en]
        ex = EncodedExample(sft.id, [(x_en, y_en), (x_en, y_t), (x_t, y_t), (x_t, y_en)])
        if ex.longest <= max_length:
            out.append(ex)
    return out


def describe(examples: list[EncodedExample]) -> dict:
    """Median, p90 and max tokens of prompts and answers (English and target)."""
    def stats(values):
        values = sorted(values)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))], "max": values[-1]}
    return {name: stats([len(ex.sequences[k][j]) for ex in examples])
            for name, k, j in (("x_en", 0, 0), ("y_en", 0, 1), ("x_t", 2, 0), ("y_t", 2, 1))}


def mix_examples(spec: dict, need: int) -> tuple[list[EncodedExample], int]:
    """(the first `need` examples of spec["mix"] at spec["length"] (module docstring), the tokenizer's pad id)."""
    from clo.model.chat import detect_format
    from clo.model.tokenizer import load_tokenizer
    from clo.pairs import demo_path, load_pairs

    tok = load_tokenizer(spec["tokenizer"])
    fmt = detect_format(tok)
    if spec.get("mix", "stretched") == "alpaca":
        examples = alpaca_examples(tok, fmt, spec["length"])
        random.Random(0).shuffle(examples)
        if need > len(examples):
            raise CloError(f"--batch-sizes x --steps: {need} examples needed, Alpaca has {len(examples)} within {spec['length']} tokens")
        return examples[:need], tok.pad_id
    pairs = load_pairs(demo_path(spec["lang"]), spec["lang"]).examples
    if need > len(pairs):
        raise CloError(f"--batch-sizes x --steps: {need} examples needed, the demo set has {len(pairs)}")
    examples, _ = encode_all(tok, fmt, pairs[:need], max_length=10**9)
    return [stretch(e, spec["length"]) for e in examples], tok.pad_id


def bench_batches(spec: dict) -> tuple[list[list[EncodedExample]], int]:
    """(spec["n_batches"] batches of spec["batch"] examples of spec["mix"], pad id), ids within the model's vocab."""
    B = spec["batch"]
    need = B * spec["n_batches"]
    vocab = spec["vocab_size"]  # a random-shape model may have a smaller vocabulary than the tokenizer
    examples, pad_id = mix_examples(spec, need)
    examples = [EncodedExample(e.id, [([t % vocab for t in p], [t % vocab for t in r]) for p, r in e.sequences]) for e in examples]
    return [examples[i : i + B] for i in range(0, need, B)], pad_id % vocab


def precision_policy(device: torch.device, clo_flags: dict) -> Precision:
    """train.py's precision (`training_precision`) for the --dtype and --amp of --clo-flags on `device`:
    the dtype both sides hold frozen weights in, and the autocast both compute under."""
    return training_precision(device, clo_flags["dtype"], clo_flags["amp"])


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


# --- memory of a worker process ----------------------------------------------------------------


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
    # called at the first "run" command, which is the warm-up's: the peak covers it and the timed steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        covers = "warm-up and timed steps"
    else:
        covers = "warm-up and timed steps" if rss_reset() else "whole worker process"
    return {"peak_covers": covers, "baseline_bytes": current_memory(device)}


def final_memory(device: torch.device, measured: dict | None) -> dict:
    """The worker's last message: its peak memory, what was measured, and what `start_peak` returned."""
    peak, kind = peak_memory(device)
    return {"peak_bytes": peak, "peak_kind": kind, **(measured or {})}
