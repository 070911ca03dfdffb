#!/usr/bin/env bash
# One GPU benchmark pass, sized for a short lease: jaxdiff vs diffusers (eager and
# torch.compile) on SD 1.5 at batch 16, the UNet's time by op category, the same bench
# with cuBLAS GEMMs only (no Triton), the x4 upscaler, a second process to time a warm
# compilation cache, batch 32, and the autotuned step's ops and bytes (tools/step_hlo.py);
# right after the profile, each attention shape alone on each kernel (tools/attention_bench.py).
# Writes JSON and the logs under $OUT (or ./bench-out).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 JAXDIFF_CACHE_DIR=/tmp/jaxdiff-xla
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import jax, flax, diffusers, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, jax.devices())"
timeout 200 python3 -m tools.bench --arch sd15 --batch-sizes 16 --steps 25 --reps 2 --compare both \
  --out "$OUT/bench_sd15.json" 2>&1 | grep -v -i warning | tee "$OUT/bench_sd15.log"
timeout 90 python3 -m tools.op_profile --arch sd15 --size 512 --batch 16 --out "$OUT/profile_sd15.json" \
  2>&1 | grep -v -i warning | tee "$OUT/profile_sd15.log"
timeout 45 python3 -m tools.attention_bench --arch sd15 --batch 16 --out "$OUT/attention_sd15.json" \
  2>&1 | grep -v -i warning | tee "$OUT/attention_sd15.log"
# Offline, the GPU compiler's cuBLAS path fused more bias and residual adds into GEMMs.
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 65 python3 -m tools.bench --arch sd15 --batch-sizes 16 \
  --steps 25 --reps 1 --no-stages --out "$OUT/bench_sd15_cublas.json" 2>&1 | grep -v -i warning | tee "$OUT/bench_cublas.log"
timeout 60 python3 -m tools.bench --arch x4-upscaler --size 128 --batch-sizes 8 --steps 20 --guidance 9 --reps 2 \
  --no-stages --compare diffusers --out "$OUT/bench_x4.json" 2>&1 | grep -v -i warning | tee "$OUT/bench_x4.log"
timeout 30 python3 -m tools.bench --arch sd15 --batch-sizes 16 --steps 25 --reps 1 --no-stages \
  --out "$OUT/bench_sd15_warm_cache.json" 2>&1 | grep -v -i warning | tee "$OUT/bench_warm.log"
timeout 50 python3 -m tools.bench --arch sd15 --batch-sizes 32 --steps 25 --reps 1 --no-stages \
  --out "$OUT/bench_sd15_b32.json" 2>&1 | grep -v -i warning | tee "$OUT/bench_b32.log"
timeout 35 python3 -m tools.step_hlo --arch sd15 --batch 16 --target local --out "$OUT/step_hlo_sd15.json" \
  --hlo-out "$OUT/sd15_step_hlo.txt" 2>&1 | grep -v -i warning | tee "$OUT/step_hlo_sd15.log"
