#!/bin/bash
# The one short GPU check (a lent CUDA machine, no network): the CUDA attention-mode tests, GradCache under
# FSDP (which accelerate runs only on accelerators, so never on CPU) and the encode FLOP/s benchmark of a
# Qwen2-VL-2B-shaped embedder. Wheels the machine lacks travel in .whl/, a slice of
# ../shared/data in .gpu_data/ (see benchmarks/README.md). Results land in $OUT (or benchmarks/results).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/cuda_check.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/cuda_check.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_attention.py tests/test_pooling.py 2>&1 | tail -15 | tee -a "$OUT/cuda_check.log"
timeout 240 python3 benchmarks/fsdp_gradcache_check.py --output-dir "$OUT" \
  --launch "python3 -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --num_processes 1" 2>&1 | tail -4 | tee -a "$OUT/cuda_check.log"
for budget in 4096 32768; do
  timeout 150 python3 benchmarks/encode_flops.py --model random:qwen2_vl-2b --device cuda --texts 768 --images 192 \
    --batch-size 64 --token-budget $budget --loader-workers 6 --repeats 2 --shared-data "${SHARED:-.gpu_data}" \
    --output-dir "$OUT" 2>&1 | tail -12 | tee -a "$OUT/cuda_check.log"
  mv "$OUT/encode_flops_cuda.json" "$OUT/encode_flops_cuda_budget$budget.json"
  mv "$OUT/encode_flops_cuda.md" "$OUT/encode_flops_cuda_budget$budget.md"
done
