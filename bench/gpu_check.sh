#!/usr/bin/env bash
# Issue #9's measurements on one GPU, in one go: run on the GPU machine from the project root,
# after ../shared/gpu/pack here and its two transfers there (../shared/gpu/README.md):
#
#   here:   ../shared/gpu/pack && bench/gpu_check.sh --pack      # + the test wheels into .gpu/whl
#   there:  source .gpu/setup.sh && bench/gpu_check.sh            # results under $OUT (a few minutes)
#
# Stages (all by default, or name some: bench/gpu_check.sh classify generate startup tests):
#   classify  case a at --dtype auto and bfloat16: accuracy, items/s vs the batch-1 plain-HF loop
#             (ratio), prediction agreement with that loop at the same dtype
#   generate  case b (tokens/s vs one prompt at a time) and case e (padded vs continuous batching)
#   startup   bench/startup.py: prompt render and a one-token generate, whole processes
#   tests     LLMLAB_TEST_DEVICE=cuda pytest -x -q on the tests that run models
# Every stage writes its JSON/text under $OUT as it finishes, so a timeout keeps what was done.
# Dry run on a CPU with tiny sizes:
#   OUT=/tmp/gc DEVICE=cpu LIMIT=8 GEN_LIMIT=4 NEW_TOKENS=4 RUNS=1 LLMLAB_SHARED=/work/shared \
#     TESTS="tests/test_gen_engine.py -k choice" bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--pack" ]; then  # wheels for the tests, next to the ones ../shared/gpu/pack put in .gpu/whl
  [ -d .gpu/whl ] || { echo "run ../shared/gpu/pack first (no .gpu/whl here)"; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl pytest pluggy iniconfig packaging
  exit $?
fi

OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-${SMOLLM2_GGUF:-smollm2}}
PY=${PY:-python3}
LIMIT=${LIMIT:-}              # SST-2 items (empty: all 872)
GEN_LIMIT=${GEN_LIMIT:-32}    # DialogSum prompts for b and e (the one-by-one loop is the slow part)
NEW_TOKENS=${NEW_TOKENS:-50}
RUNS=${RUNS:-2}
TESTS=${TESTS:-tests/test_classify.py tests/test_models.py tests/test_gen_engine.py tests/test_learn_next.py tests/test_learn_info.py}
STAGES=${*:-classify generate startup tests}
mkdir -p "$OUT"

log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/log.txt"; }
bench() { "$PY" bench/bench.py --device "$DEVICE" --model "$MODEL" --new-tokens "$NEW_TOKENS" "$@"; }

log "start: stages '$STAGES', device $DEVICE, model $MODEL, load $(cut -d' ' -f1 /proc/loadavg)"
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/versions.txt"

for stage in $STAGES; do
  case $stage in
    classify)
      for dtype in auto bfloat16; do
        log "classify, --dtype $dtype"
        bench --cases a --dtype "$dtype" ${LIMIT:+--limit "$LIMIT"} --json "$OUT/classify-$dtype.json" \
          2>>"$OUT/log.txt" | tee "$OUT/classify-$dtype.md"
      done ;;
    generate)
      log "generate (b) and the engines (e)"
      bench --cases b,e --limit "$GEN_LIMIT" --json "$OUT/generate.json" 2>>"$OUT/log.txt" | tee "$OUT/generate.md" ;;
    startup)
      log "start-up"
      "$PY" bench/startup.py --runs "$RUNS" --model "$MODEL" --device "$DEVICE" "prompt render" "generate 1 token" \
        2>>"$OUT/log.txt" | tee "$OUT/startup.txt" ;;
    tests)
      log "tests on $DEVICE: $TESTS"
      if ! "$PY" -c "import pytest" 2>/dev/null; then
        log "pytest is not installed here: bench/gpu_check.sh --pack adds its wheels to .gpu/whl"
        continue
      fi
      # shellcheck disable=SC2086 # TESTS is a list of paths and options
      LLMLAB_TEST_DEVICE=$DEVICE "$PY" -m pytest -x -q -p no:cacheprovider $TESTS 2>&1 | tail -40 | tee "$OUT/tests.txt" ;;
    *) log "unknown stage '$stage' (classify, generate, startup, tests)" ;;
  esac
done
log "done"
