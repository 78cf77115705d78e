#!/usr/bin/env bash
# The checks and benchmarks run on a lent GPU (see bench/gpu/README.md for the whole procedure).
# Runs from the repository root on the device machine, after `bench/gpu/carry.sh unpack` put
# the carried models, prompts and wheels in /root/g (and, for the vLLM stages, vLLM 0.24 was
# installed under /root/site: ../shared/gpu-vllm). Each stage has its own time limit and its
# log under $OUT; a failed stage does not stop the next. STAGES picks some (default: the torch
# ones); a call runs at most 10 minutes, so run "vllm_tests" and "side_by_side" as calls of
# their own (vLLM's first start there compiles and autotunes: ~3 minutes).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 AFA_SERVE_CACHE_DIR=/root/afa-cache
PROMPTS=/root/g/prompts.jsonl

STAGES=${STAGES:-models cuda_tests draft_cost torch_bench torch_bench_fp32}

stage() {
  local name=$1 limit=$2 start rc
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  tail -n "${TAIL:-20}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

# gguf imports mistral_common if present, which (as carried, without pycountry) fails with a
# RuntimeError instead of the ImportError gguf expects: hide it from this one process.
stage models 90 python3 -c 'import runpy, sys; sys.modules["mistral_common"] = None
sys.argv[0] = "bench/gpu/models.py"; runpy.run_path(sys.argv[0], run_name="__main__")' \
  build --carried /root/g --out /root/models

# The compact draft forward against transformers' on CUDA, and speculative = plain there.
TAIL=30 stage cuda_tests 90 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_draft_forward.py

# c and v on CUDA: the engine's calibration, and the draft step through HF beside the engine's.
TAIL=12 stage draft_cost 90 python3 bench/draft_cost.py --device cuda --dtype bfloat16 \
  --target /root/models/target --drafts /root/models/draft --head-sizes 0 4096 \
  --draft-weights dtype int8 --rounds 5 --out "$OUT/draft_cost_gpu.json"

# The embedded torch engine on CUDA: plain, fixed k, the default policy and its draft alone.
TAIL=30 stage torch_bench 200 python3 -m afa_serve bench --target /root/models/target \
  --draft /root/models/draft --prompts "$PROMPTS" --limit 6 --max-new-tokens 96 \
  --dtype bfloat16 --device cuda --out "$OUT/bench_gpu_bf16.json"
TAIL=30 stage torch_bench_fp32 100 python3 -m afa_serve bench --target /root/models/target \
  --draft /root/models/draft --prompts "$PROMPTS" --limit 4 --max-new-tokens 64 \
  --dtype float32 --device cuda --out "$OUT/bench_gpu_fp32.json"

# The real-vLLM test module of CI, on vLLM 0.24 on the GPU (float32, as in CI).
TAIL=40 stage vllm_tests "${VLLM_TESTS_LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider \
  tests/vllm/test_vllm_engine.py

# vLLM's server and afa-serve (vLLM and torch engines), plain and with the draft, side by side.
TAIL=30 stage side_by_side "${SIDE_BY_SIDE_LIMIT:-540}" python3 bench/side_by_side.py \
  --target /root/models/target --draft /root/models/draft --prompts "$PROMPTS" \
  --num-prompts 8 --max-tokens 128 --dtype bfloat16 \
  --configs afa-torch-plain,afa-torch-spec,vllm-spec,afa-vllm-spec,vllm-plain \
  --out "$OUT/side_by_side_gpu.json"
