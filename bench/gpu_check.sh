#!/usr/bin/env bash
# What a GPU session checks, in one command, each part under its own time limit:
#   bash bench/gpu_check.sh                 # what issues 13 and 14 still need: tests train-alpaca-cold translate translate-eager
#   bash bench/gpu_check.sh tests translate # only the parts named
# Parts:
#   tests               the CUDA tests (tests/test_cuda.py)
#   train-alpaca        bench/bench_train.py --mix alpaca: Alpaca's spread of lengths capped at 2048, clo packed (--packing
#                       on: on CUDA through FlexAttention's block mask, --attention auto), clo padded and TRL, examples/s and
#                       MFU on real tokens (issue 14's GPU goal: >= 2x TRL, >= 55% MFU)
#   translate           bench/bench_translate.py: a random m2m100_1.2B-shaped checkpoint in bf16, batch 32, 5 beams, clo vs
#                       transformers' generate, sentences/s (issue 13's goal: >= 1.5x); clo's step compiled (--compile auto)
#   translate-eager     the same with clo's eager step (--compile off): 1.30x on an H200 (2026-12-04), the lever's baseline
#   fsdp-world1         bench/bench_fsdp_world1.py (FSDP2 over one GPU vs the plain step, 7B shape: time, memory, equal
#                       losses; both copies of the model in one process: ~90 GB, so an H200 or a smaller MODEL; issue 13)
#   train               bench/bench_train.py (Llama-2-7B shape, random bf16 weights, sequence 1024, vs TRL; issue 6, measured)
#   generate            bench/bench_generate.py (same shape, batch 1 and 16, compiled decode vs transformers; issue 6, measured)
#   train-checkpointing bench/bench_train.py, clo only, with --checkpoint-activations (issue 6, measured)
#   train-alpaca-sdpa   as train-alpaca, clo packed with the dense mask (--attention sdpa): FlexAttention's gain on CUDA
#   train-alpaca-cold   clo packed only, the first 64 steps of the same shuffled mix with no warm-up: what a first epoch pays
#                       to compile a graph per packed shape (one row since 2026-12-06: 7 lengths in these 64 steps, 10 in the
#                       epoch, against 22 and 42 [rows, length] shapes before; ~10 s each on an H200), the gate of CUDA's
#                       --packing auto beside the tests
# train-alpaca's warm-up covers every batch once: each new shape compiles clo's blocks (~10 s on an H200, 2026-12-04),
# so timed steps after a warm-up shorter than the batches measured the compiler, not the step.
# Measured on an H200 on 2026-12-04 (BENCHMARKS.md): train-alpaca, fsdp-world1, and translate with the eager step.
# The default limits of the four default parts add up to 520 s, plus 5 s of kill grace each and the wheels' install, inside
# one device call (600 s at most); with 15 minutes of device time in all, run them once and spend what is left on a part
# that failed.
# Logs and JSON results go to $OUT (default runs/gpu). Optional, for machines without internet:
#   .whl/  wheels installed first (trl, datasets, ... : see BENCHMARKS.md), .tok/  the tokenizer folder,
#   shared/data/alpaca/alpaca_5000.json  a copy of ../shared's Alpaca file (train-alpaca needs it; ../shared does not travel).
# Limits (seconds) can be changed with TESTS_S, ALPACA_S, TRANSLATE_S, TRANSLATE_EAGER_S, FSDP_S, TRAIN_S, ...; a part with limit 0 is skipped.
# DEVICE/MODEL/ARGS for a CPU dry run, e.g. DEVICE=cpu MODEL=<tiny HF folder> TRANSLATE_ARGS="--shape tiny ...".
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 CLO_CACHE=${CLO_CACHE:-/tmp/clo-cache}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # both sides: less fragmentation near 80 GB
[ -d shared/data ] && export CLO_SHARED_DATA=${CLO_SHARED_DATA:-$PWD/shared/data}  # ../shared does not travel: a copy inside does
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-random:llama2-7b}
TOKENIZER=${TOKENIZER:-$( [ -d .tok ] && echo .tok || echo smollm2-135m-instruct )}
WHEELS=${WHEELS-.whl}  # WHEELS= (empty) skips the install
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python3 -c "import trl; print('trl', trl.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

PARTS=${*:-tests train-alpaca-cold translate translate-eager}

part() {  # part NAME SECONDS COMMAND...: if NAME is asked for, run it, tee the log, record the exit status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  if [ "$limit" = 0 ]; then echo "=== $name: skipped (limit 0)"; return; fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
}

part tests "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py ${TEST_ARGS:-}
part train-alpaca-cold "${ALPACA_COLD_S:-160}" python3 bench/bench_train.py --device "$DEVICE" --model "$MODEL" --tokenizer "$TOKENIZER" \
  --mix alpaca --sides clo --clo-flags="--packing on" --json "$OUT/train-alpaca-cold.json" \
  ${ALPACA_COLD_ARGS:---batch-sizes 8 --warmup 0 --rounds 1 --steps 64}
part train-alpaca "${ALPACA_S:-220}" python3 bench/bench_train.py --device "$DEVICE" --model "$MODEL" --tokenizer "$TOKENIZER" \
  --mix alpaca --sides clo clo-padded trl --clo-flags="--packing on" --json "$OUT/train-alpaca.json" \
  ${ALPACA_ARGS:---batch-sizes 8 --warmup 5 --rounds 1 --steps 5}
part translate "${TRANSLATE_S:-180}" python3 bench/bench_translate.py --device "$DEVICE" --json "$OUT/translate.json" \
  ${TRANSLATE_ARGS:---shape 1.2B --dtype bfloat16 --batch-size 32 --beams 5 --max-length 64 --repeats 2}
part translate-eager "${TRANSLATE_EAGER_S:-60}" python3 bench/bench_translate.py --device "$DEVICE" --json "$OUT/translate-eager.json" \
  --compile off ${TRANSLATE_ARGS:---shape 1.2B --dtype bfloat16 --batch-size 32 --beams 5 --max-length 64 --repeats 2}
part fsdp-world1 "${FSDP_S:-120}" python3 bench/bench_fsdp_world1.py --device "$DEVICE" --model "$MODEL" --tokenizer "$TOKENIZER" --steps 4 \
  --json "$OUT/fsdp-world1.json" ${FSDP_ARGS:-}
part train "${TRAIN_S:-220}" python3 bench/bench_train.py --device "$DEVICE" --model "$MODEL" --tokenizer "$TOKENIZER" \
  --json "$OUT/train.json" ${TRAIN_ARGS:-}
part generate "${GENERATE_S:-140}" python3 bench/bench_generate.py --device "$DEVICE" --model "$MODEL" --tokenizer "$TOKENIZER" \
  --json "$OUT/generate.json" ${GENERATE_ARGS:-}
part train-checkpointing "${CHECKPOINTING_S:-70}" python3 bench/bench_train.py --device "$DEVICE" --model "$MODEL" \
  --tokenizer "$TOKENIZER" --sides clo --clo-flags=--checkpoint-activations --json "$OUT/train-checkpointing.json" ${TRAIN_ARGS:-}
part train-alpaca-sdpa "${ALPACA_SDPA_S:-150}" python3 bench/bench_train.py --device "$DEVICE" --model "$MODEL" --tokenizer "$TOKENIZER" \
  --mix alpaca --sides clo --clo-flags="--packing on --attention sdpa" --json "$OUT/train-alpaca-sdpa.json" \
  ${ALPACA_ARGS:---batch-sizes 8 --warmup 5 --rounds 1 --steps 5}
