"""How many graphs compiled blocks build over an epoch: the distinct batch shapes train.py's step feeds them.

    python bench/bench_shapes.py                       # Alpaca's lengths, batch 8, capped at 2048 tokens (the GPU bench's mix)
    python bench/bench_shapes.py --batch-size 16 --max-length 512

`compile_blocks` (clo/runtime.py) compiles each decoder block with `dynamic=False`: one graph per shape,
each ~10 s to build for a 7B shape on an H200 (BENCHMARKS.md). Packed rows on CUDA (`--packing on`,
FlexAttention) are one row of every segment, its length rounded up to 4 lengths per doubling
(`row_length`, `few_shapes`); before, rows as long as the longest segment (bucket 128), [rows, length]
both varying by batch. Padded rows on CUDA (`--packing off`, one length group, bucket 64) are
[4 x batch, bucketed length]. Also the tokens each layout computes per real token (row tails and
padding; packed rows compute each prompt once, so fewer than the four sequences hold). Counted without
a model or a device: the Alpaca mix of bench/workload.py (shuffled with seed 0, as bench_train.py
shuffles it) in train.py's batches.
"""

import argparse
import random

import torch
from common import machine  # puts clo on sys.path
from workload import alpaca_examples

from clo.model.chat import detect_format
from clo.model.sources import DEFAULT_MODEL, resolve_model
from clo.model.tokenizer import load_tokenizer
from clo.train.batching import flat_sequences, round_up
from clo.train.packing import pack
from clo.train.scoring import Batching


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="a model folder or name whose tokenizer and chat format encode the mix")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--max-length", type=int, default=2048, help="examples whose longest sequence is longer are left out")
    p.add_argument("--packed-bucket", type=int, default=128, help="packed rows' length bucket (FlexAttention's block)")
    p.add_argument("--padded-bucket", type=int, default=64, help="padded rows' length bucket (compiled, CUDA)")
    args = p.parse_args(argv)
    tok = load_tokenizer(resolve_model(args.tokenizer))
    examples = alpaca_examples(tok, detect_format(tok), args.max_length)
    random.Random(0).shuffle(examples)
    B = args.batch_size
    batches = [examples[i : i + B] for i in range(0, len(examples) - B + 1, B)]
    packed = Batching.resolve(tok.pad_id, args.packed_bucket, 1, torch.device("cuda"), compiled=True, packing="on")  # as train.py on CUDA
    layouts = {"packed": lambda seqs: packed.pack(seqs).tokens.shape,
               "packed_rows": lambda seqs: pack(seqs, tok.pad_id, args.packed_bucket).tokens.shape,
               "padded": lambda seqs: (len(seqs), round_up(max(len(x) + len(y) for x, y in seqs), args.padded_bucket))}
    result = {"batches": len(batches)}
    real = sum(len(x) + len(y) for b in batches for x, y in flat_sequences(b))
    for name, shape_of in layouts.items():
        shapes = [tuple(shape_of(flat_sequences(b))) for b in batches]
        firsts = sorted({s: k for k, s in reversed(list(enumerate(shapes)))}.values())  # the step where each shape first comes
        result[name] = {"shapes": len(set(shapes)), "tokens_per_real_token": sum(r * n for r, n in shapes) / real,
                        "new_shapes_in_first_steps": {n: sum(k < n for k in firsts) for n in (10, 32, 64, 128)}}
    print(f"{machine()['cpu']}: {len(examples)} examples within {args.max_length} tokens, {result['batches']} batches of {B}")
    for name in layouts:
        r = result[name]
        print(f"  {name:<12} {r['shapes']:>4} distinct shapes (new within the first 10/32/64/128 steps: "
              f"{list(r['new_shapes_in_first_steps'].values())}), {r['tokens_per_real_token']:.3f} tokens computed per real token")
    return result


if __name__ == "__main__":
    main()
