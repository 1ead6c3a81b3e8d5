"""Decode speed: clo.model.generate vs transformers' `generate` on the same weights, greedy, batch 1 and 16.

    python bench/bench_generate.py                               # SmolLM2-135M-Instruct, CPU, fp32 (about 2 min)
    python bench/bench_generate.py --device cuda --model random:llama2-7b   # bf16 on the GPU

Prompts are the demo set's target-language prompts in the model's chat format (batch b: the first b
of them, so a batch has prompts of different lengths, left-padded on both sides). Both sides decode
greedily exactly --new-tokens tokens: end-of-turn and EOS do not stop either (clo: no stop ids;
transformers: eos_token_id=None), so both do the same number of decoding steps.

Each implementation generates --new-tokens tokens and, separately, one token (the prefill and the
first token); runs alternate clo, transformers, clo, ... and the medians count:

    decode tok/s = batch x (new_tokens - 1) / (t(new_tokens) - t(1))     (prefill excluded)
    end-to-end tok/s = batch x new_tokens / t(new_tokens)

transformers runs its default generate (dynamic KV cache, SDPA, no compile); clo.model.generate runs its
static KV cache, its decode step compiled with static shapes (CUDA graphs) with `--compile auto` on
CUDA, eager on CPU. The warm-up call compiles; timed calls reuse the graph. The table also says
whether the two produced the same tokens.
"""

import argparse
import statistics
import sys
import time

import torch
from common import (  # puts clo on sys.path
    RANDOM_SHAPES,
    bench_device,
    clo_model,
    hf_model,
    machine,
    model_config,
    model_name,
    quiet_transformers,
    resolve_models,
    sync,
    write_results,
)

from clo.errors import CloError, run_cli


def bench_prompts(tokenizer_folder: str, lang: str, n: int, vocab: int) -> tuple[list[list[int]], int]:
    """(the first n demo prompts x_t as chat-formatted ids, modulo `vocab`; the pad id)."""
    from clo.model.chat import detect_format, encode_prompt
    from clo.model.tokenizer import load_tokenizer
    from clo.pairs import demo_path, load_pairs

    tok = load_tokenizer(tokenizer_folder)
    fmt = detect_format(tok)
    examples = load_pairs(demo_path(lang), lang).examples
    if n > len(examples):
        raise CloError(f"--batch-sizes: {n} prompts needed, the demo set has {len(examples)}")
    return [[t % vocab for t in encode_prompt(tok, fmt, ex.prompt)] for ex in examples[:n]], tok.pad_id % vocab


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """transformers' greedy generate on left-padded prompts; returns the new ids of each row."""
    from transformers import GenerationConfig

    device = model.device
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, L:].tolist()


def clo_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, compile: bool) -> list[list[int]]:
    from clo.model.generate import generate

    return generate(model, prompts, new_tokens, stop_ids=set(), pad_id=pad_id, compile=compile)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="smollm2-135m-instruct", help=f"HF folder, the default model's name, or random:<shape> ({', '.join(RANDOM_SHAPES)})")
    p.add_argument("--tokenizer", help="folder whose tokenizer encodes the prompts (default: the model's, else the default model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="weights of both (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="compile clo's decode step (auto: on for CUDA)")
    p.add_argument("--lang", default="sw", help="demo set whose prompts are used")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="prompts per generate call")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (no early stop)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each implementation, alternating; medians count")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="where the results go (default runs/bench/generate-<device>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.new_tokens < 2 or args.runs < 1:
        raise CloError("--new-tokens must be >= 2 and --runs >= 1")
    device = bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from clo.runtime import default_dtype, on_for_cuda

    quiet_transformers()
    model_spec, tokenizer = resolve_models(args.model, args.tokenizer)
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    spec = {"model": model_spec}
    ours = clo_model(spec, device, dtype)
    theirs = hf_model(spec, device, dtype).eval()
    vocab = model_config(spec)["vocab_size"]
    compile = on_for_cuda(args.compile, device)
    implementations = {"clo": lambda p, n, pad: clo_generate(ours, p, n, pad, compile), "transformers": lambda p, n, pad: hf_generate(theirs, p, n, pad)}

    rows = []
    for batch in args.batch_sizes:
        prompts, pad_id = bench_prompts(tokenizer, args.lang, batch, vocab)
        rows.append(measure(implementations, prompts, pad_id, args.new_tokens, args.runs, device))
        print(f"batch {batch}: clo {rows[-1]['clo']['decode_tokens_per_s']:.1f} tok/s, transformers "
              f"{rows[-1]['transformers']['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)

    info = machine()
    title = (f"{model_name(model_spec)}, {args.device}, "
             f"{str(dtype).removeprefix('torch.')}, greedy, {args.new_tokens} new tokens, median of {args.runs} runs, "
             f"clo decode {'compiled' if compile else 'eager'}; "
             f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"\n{title}\nmachine: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads)"
          f"{', ' + info['gpu'] if 'gpu' in info else ''}\n")
    print(table(rows))
    write_results(args.json, f"generate-{device.type}", {"title": title, "machine": info, "settings": vars(args), "rows": rows})
    return rows


def measure(implementations: dict, prompts: list[list[int]], pad_id: int, new_tokens: int, runs: int, device: torch.device) -> dict:
    """One batch: a warm-up call of each implementation, then `runs` alternating runs of new_tokens and of 1 token."""
    batch = len(prompts)
    with torch.inference_mode():
        for name, generate in implementations.items():  # warm-up: allocations, kernel choices, compiling
            start = time.perf_counter()
            generate(prompts, 8, pad_id)  # CUDA graphs record on a later call than the compiling one
            print(f"batch {batch}: {name} warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr)
        times = {name: {1: [], new_tokens: []} for name in implementations}
        outputs = {}
        for _ in range(runs):
            for n in (new_tokens, 1):
                for name, generate in implementations.items():
                    sync(device)
                    start = time.perf_counter()
                    result = generate(prompts, n, pad_id)
                    sync(device)
                    times[name][n].append(time.perf_counter() - start)
                    if n == new_tokens:
                        outputs[name] = result
    row = {"batch": batch, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "new_tokens": new_tokens}
    for name, t in times.items():
        t_n, t_1 = statistics.median(t[new_tokens]), statistics.median(t[1])
        row[name] = {"decode_tokens_per_s": batch * (new_tokens - 1) / max(t_n - t_1, 1e-9),
                     "end_to_end_tokens_per_s": batch * new_tokens / t_n, "t_new_tokens_s": t[new_tokens], "t_1_s": t[1],
                     "lengths_ok": all(len(o) == new_tokens for o in outputs[name])}
    row["same_tokens"] = sum(a == b for a, b in zip(outputs["clo"], outputs["transformers"])) / batch
    return row


def table(rows: list[dict]) -> str:
    """The markdown table: one row per batch size, both implementations, and their ratio."""
    lines = ["| batch | prompt tokens | clo decode tok/s | transformers decode tok/s | speed-up | clo end-to-end tok/s | "
             "transformers end-to-end tok/s | same tokens |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a, b = row["clo"], row["transformers"]
        lengths_ok = "" if a["lengths_ok"] and b["lengths_ok"] else " (a row stopped early!)"
        lines.append(f"| {row['batch']} | {row['prompt_tokens'][0]}-{row['prompt_tokens'][1]} | {a['decode_tokens_per_s']:.1f} | "
                     f"{b['decode_tokens_per_s']:.1f} | {a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x | "
                     f"{a['end_to_end_tokens_per_s']:.1f} | {b['end_to_end_tokens_per_s']:.1f} | {100 * row['same_tokens']:.0f}% of rows{lengths_ok} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
