"""Translation speed: clo's M2M100 decoding vs transformers' generate, same weights, same settings.

    python bench/bench_translate.py                       # m2m100_418M shape, beams 4 and 2, CPU
    python bench/bench_translate.py --shape 1.2B --device cuda --dtype bfloat16 --batch-size 32 --beams 5   # issue 13's GPU check

The real checkpoints cannot be downloaded here, so the model has random weights in the shape of
facebook/m2m100_418M (d_model 1024, 12+12 layers, 16 heads, FFN 4096, vocab 128112) or
facebook/m2m100_1.2B (24+24 layers, FFN 8192), or `tiny` (d_model 64, 2+2 layers: for tests and dry runs). It is written once, in HF format, to --folder (under
/tmp by default, never into the repository). Sources are random token ids of about 30 tokens.
A random model never emits </s>, so every sentence decodes to --max-length: the numbers compare
the cost per decoding step (both implementations do the same number of steps), not the early exits
that real translations of unequal length also allow. Outputs of the two are checked to be identical.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from common import machine, sync, write_results  # puts clo on sys.path

from clo.runtime import on_for_cuda
from clo.translate.m2m100 import load_m2m100
from clo.translate.search import GenerationSettings, generate
from clo.translate.tokenizer import LANGUAGE_CODES

SHAPES = {
    "418M": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    "1.2B": dict(d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=8192, decoder_ffn_dim=8192),
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ensure_random_checkpoint(folder: Path, shape: str, device: torch.device, dtype: torch.dtype) -> None:
    """Write a random checkpoint of `shape` to `folder`, unless one is there: built on `device`, saved in `dtype`."""
    import transformers

    if (folder / "model.safetensors").is_file():
        return
    print(f"writing a random m2m100_{shape}-shaped checkpoint to {folder} ...", file=sys.stderr)
    torch.manual_seed(0)
    config = transformers.M2M100Config(vocab_size=128112, max_position_embeddings=1024, **SHAPES[shape])
    with device:
        model = transformers.M2M100ForConditionalGeneration(config)
    model.to(dtype).save_pretrained(folder)


def source_batches(n_batches: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of `__en__ tokens </s>`, 25..35 tokens each (pad 1, eos 2, __en__ 128022)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(25, 36, (batch_size,), generator=gen).tolist()
        src = torch.full((batch_size, max(lengths)), 1)
        for row, n in enumerate(lengths):
            src[row, 0] = 128022
            src[row, 1:n - 1] = torch.randint(4, 128000, (n - 2,), generator=gen)
            src[row, n - 1] = 2
        batches.append((src, src.ne(1).long()))
    return batches


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="418M", choices=SHAPES, help="which M2M100 shape (default 418M)")
    parser.add_argument("--folder", default=None, help="where the random checkpoint lives (default /tmp/m2m100_<shape>_random)")
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 2], help="beam sizes to measure (default 4 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per batch (default 8)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per setting (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each implementation, alternating; the best counts (default 3)")
    parser.add_argument("--max-length", type=int, default=32, help="decoder tokens per sentence incl. the start token (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="(default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="clo's beam search through the compiled static-shape step, as translate.py's --compile on (auto: on for CUDA)")
    parser.add_argument("--json", default=None, help="where the results go (default runs/bench/translate-<shape>-<device>.json)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder or f"/tmp/m2m100_{args.shape}_random")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    compile = on_for_cuda(args.compile, device)
    ensure_random_checkpoint(folder, args.shape, device, dtype)
    ours = load_m2m100(folder, device, dtype)
    hf = transformers.M2M100ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    batches = [(s.to(device), m.to(device)) for s, m in source_batches(args.batches, args.batch_size)]
    forced = 128004 + LANGUAGE_CODES["m2m100"].index("sw")  # __sw__, after the 128004-entry dictionary

    print(f"device: {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, m2m100_{args.shape} shape, "
          f"batch {args.batch_size}, {args.batches} batches x best of {args.repeats}, max_length {args.max_length}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, clo --compile {'on' if compile else 'off'}")
    table = []
    print("| beams | clo sent/s | transformers sent/s | speed-up | same output | clo warm-up s |")
    print("|---|---|---|---|---|---|")
    for beams in args.beams:
        settings = GenerationSettings(max_length=args.max_length, num_beams=beams, early_stopping=True)
        hf_kwargs = dict(num_beams=beams, max_length=args.max_length, early_stopping=True,
                         forced_bos_token_id=forced, do_sample=False)
        with torch.inference_mode():  # warm-up: first calls allocate and pick kernels; clo's compiles its step for these shapes
            sync(device)
            start = time.perf_counter()
            generate(ours, *batches[0], forced, settings if compile else GenerationSettings(max_length=4, num_beams=beams), compile)
            sync(device)
            warmup = time.perf_counter() - start
            hf.generate(input_ids=batches[0][0], attention_mask=batches[0][1], **{**hf_kwargs, "max_length": 4})
        # Alternate the two, --repeats times each, and keep each one's best time: on a shared
        # machine the slowest runs measure the neighbours, not the code.
        best, outputs = {"clo": float("inf"), "transformers": float("inf")}, {}
        for _ in range(args.repeats):
            for name in best:
                sync(device)
                start = time.perf_counter()
                results = []
                with torch.inference_mode():
                    for src, mask in batches:
                        if name == "clo":
                            results += generate(ours, src, mask, forced, settings, compile)
                        else:
                            rows = hf.generate(input_ids=src, attention_mask=mask, **hf_kwargs).tolist()
                            results += [row[1:] for row in rows]
                sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
                outputs[name] = results
        rates = {name: len(batches) * args.batch_size / seconds for name, seconds in best.items()}
        same = all(h[:len(o)] == o and all(t == 1 for t in h[len(o):]) for o, h in zip(outputs["clo"], outputs["transformers"]))
        print(f"| {beams} | {rates['clo']:.2f} | {rates['transformers']:.2f} | {rates['clo'] / rates['transformers']:.2f}x | {same} | {warmup:.1f} |",
              flush=True)
        table.append({"beams": beams, "sentences_per_s": rates, "best_seconds": best, "speedup": rates["clo"] / rates["transformers"],
                     "same_output": same, "clo_warmup_s": warmup})
    settings = {k: getattr(args, k) for k in ("shape", "batch_size", "batches", "repeats", "max_length", "device", "dtype", "compile")}
    write_results(args.json, f"translate-{args.shape}-{device.type}",
                  {"machine": machine(), "transformers": transformers.__version__, "settings": settings, "rows": table})


if __name__ == "__main__":
    main()
