#!/usr/bin/env bash
# GPU benchmark steps, sized for a 10-minute run. Usage: bash tools/gpu_bench.sh [STEP ...]
# (no step: sd15 warm x4 b32 profile). The default steps' time limits and the
# preamble's add up to 585 s, plus a few seconds to install the wheels in .whl/: one
# 10-minute call. On an H200 (2026-11-28) each process had its full-size random models
# built 9-13 s after it started, and the steps ran well inside their limits: sd15, warm,
# x4 and two more sd15 processes took 362 s with the preamble; profile, attention and b32
# 141 s. The bench's progress lines say where a step that runs out of time was.
#   sd15       jaxdiff vs diffusers eager and torch.compile, SD 1.5 at batch 16, with stages
#   sd15v      sd15 with the engine's default, with all three opt-in kernels (the fused
#              variant below), with tokamax's flash attention (attn) and with all four (all),
#              each against diffusers eager and torch.compile in the same run
#              (tools/bench.py --variants none,fused,attn,all --compare both: a ratio for each)
#   jaxdiff    sd15 without diffusers or stages: jaxdiff's img/s and cold compile alone
#   warm       a second process on the same program: the warm compilation cache (after sd15
#              in the same call)
#   x4         the x4 upscaler, 128 -> 512, 20 steps, CFG, batch 8, vs diffusers eager
#   profile    the UNet's op time by category (tools/op_profile.py)
#   attention  the tokamax attention path's parity tests on the card first (tests/test_attention.py,
#              the UNet's bfloat16 test with JAXDIFF_ATTENTION=tokamax), then each attention shape
#              alone on each kernel (tools/attention_bench.py; tokamax's kernels from .whl/)
#   triton     sd15 with Triton GEMMs allowed (the engine asks XLA for cuBLAS ones)
#   b32        sd15 at batch 32
#   parity     the models' parity tests against diffusers (pytest -m parity) run on the GPU:
#              its kernels (cuDNN attention in bfloat16, at SD 1.5's head dims too), float32
#              at full precision (no TF32), four test processes sharing the card; the TPU
#              kernel's test (Pallas' TPU interpreter) stays on the CPU's suite
#   hlo        the step as the device compiles it (conv algorithms autotuned): ops and bytes
#              (tools/step_hlo.py --target local)
#   geglu      the fused kernel's parity tests on the card first (tests/test_geglu.py, and the
#              UNet's bfloat16 test with JAXDIFF_GEGLU=tokamax), then the feed-forward's GEGLU
#              alone at SD 1.5's shapes, XLA against tokamax's fused kernel
#              (tools/kernel_bench.py --op geglu)
#   tokamax    the jaxdiff step with JAXDIFF_GEGLU=tokamax: end to end, to set beside jaxdiff's
#   norm       the norm kernels' parity tests compiled for the card first (tests/test_layer_norm.py,
#              tests/test_group_norm.py, the UNet's bfloat16 test with both kernels), then the
#              transformer blocks' layer norm and the UNet's group norms alone, XLA against the
#              Pallas kernels (tools/kernel_bench.py --op layer_norm, --op group_norm: 25 group
#              norm shapes at four kernel sizes, each a compile)
#   upsample   the UNet's upsamplers alone: the engine's phase convolution, the same as one GEMM over
#              2x2 windows, and diffusers' plain form (tools/kernel_bench.py --op upsample)
#   ln         the jaxdiff step with JAXDIFF_LAYER_NORM=pallas
#   gn         the jaxdiff step with JAXDIFF_GROUP_NORM=pallas
#   fused      the jaxdiff step with all three: JAXDIFF_GEGLU=tokamax JAXDIFF_LAYER_NORM=pallas
#              JAXDIFF_GROUP_NORM=pallas
#   fprofile   the profile step with all three kernels: where the time goes after them
#   variants   the engine with none, all three, each kernel alone, tokamax's flash attention
#              (attn) and all four in one process, on the same weights, their timed batches in
#              turns (tools/bench.py --variants): the fused kernels' end-to-end figures in one
#              step, free of one machine's drift against another
# The device's image has jax, flax, torch and transformers; diffusers (for --compare) and
# tokamax with what it imports that the image lacks (for geglu and tokamax) come as wheels
# in .whl/ (git-ignored), fetched on any machine with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 -d .whl diffusers==0.42.1 \
#     importlib_metadata==10.2.0 tokamax==0.0.17 xprof==2.24.2 qwix==0.1.8 pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 einshape==1.0 \
#     immutabledict==4.3.1 fire==0.7.1 termcolor==3.3.0
# Writes JSON and the logs under a scratch folder and, after each step, packs them all into
# $OUT/gpu_bench.tgz (or ./bench-out/): one file to copy back, and a step cut off by a time
# limit must not lose the ones before it.
set -u -o pipefail
all_steps=" sd15 sd15v jaxdiff warm x4 profile attention triton b32 parity hlo geglu tokamax norm upsample ln gn fused fprofile variants "
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(sd15 warm x4 b32 profile)
for s in "${steps[@]}"; do
  [[ $all_steps == *" $s "* ]] || { echo "unknown step: $s (steps:$all_steps)" >&2; exit 2; }
done
RESULTS=${OUT:-bench-out}; SCRATCH=$(mktemp -d); mkdir -p "$RESULTS"
pack() { tar czf "$RESULTS/gpu_bench.tgz.tmp" -C "$SCRATCH" . && mv "$RESULTS/gpu_bench.tgz.tmp" "$RESULTS/gpu_bench.tgz"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# One compilation cache for this call's steps, empty at its start (a warm machine keeps /tmp
# between calls): sd15's first call is a cold compile and warm's a cache load of it. The
# jaxdiff step gets a cache of its own, so its first call is a cold compile wherever it runs.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 JAXDIFF_CACHE_DIR=$(mktemp -d)
{ timeout 10 nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  timeout 30 python3 -c "import jax, flax, diffusers, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, jax.devices())"
} 2>&1 | tee "$SCRATCH/preamble.log"

# step NAME SECONDS COMMAND...: run it under a time limit, its output (warnings dropped) in
# NAME.log, ending with its exit status (124: it ran out of time).
step() {
  local name=$1 limit=$2 status; shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -i warning | tee "$SCRATCH/$name.log"
  status=${PIPESTATUS[0]}
  echo "== $name: exit status $status" | tee -a "$SCRATCH/$name.log"
  pack
}
sd15=(python3 -m tools.bench --arch sd15 --batch-sizes 16 --steps 25)
fused=(JAXDIFF_GEGLU=tokamax JAXDIFF_LAYER_NORM=pallas JAXDIFF_GROUP_NORM=pallas)
# end_to_end NAME [VAR=VALUE ...]: sd15 without diffusers or stages in a process with these
# variables and a compilation cache of its own (its first call a cold compile).
end_to_end() {
  local name=$1; shift
  step "$name" 120 env "$@" JAXDIFF_CACHE_DIR="$(mktemp -d)" "${sd15[@]}" --reps 2 --no-stages \
    --out "$SCRATCH/bench_sd15_$name.json"
}
run_step() {
  case $1 in
    sd15) step sd15 200 "${sd15[@]}" --reps 2 --compare both --out "$SCRATCH/bench_sd15.json" ;;
    sd15v) step sd15v 330 "${sd15[@]}" --reps 2 --no-stages --compare both --variants none,fused,attn,all \
             --out "$SCRATCH/bench_sd15_variants_vs_diffusers.json" ;;
    jaxdiff) end_to_end jaxdiff ;;
    warm) step warm 60 "${sd15[@]}" --reps 1 --no-stages --out "$SCRATCH/bench_sd15_warm_cache.json" ;;
    x4) step x4 135 python3 -m tools.bench --arch x4-upscaler --size 128 --batch-sizes 8 --steps 20 --guidance 9 \
          --reps 2 --no-stages --compare diffusers --out "$SCRATCH/bench_x4.json" ;;
    profile) step profile 75 python3 -m tools.op_profile --arch sd15 --size 512 --batch 16 --out "$SCRATCH/profile_sd15.json" ;;
    fprofile) step fprofile 75 env "${fused[@]}" python3 -m tools.op_profile --arch sd15 --size 512 --batch 16 \
                --out "$SCRATCH/profile_sd15_fused.json" ;;
    attention) step attention 200 bash -c "JAX_PLATFORMS=cuda JAXDIFF_ATTENTION=tokamax XLA_PYTHON_CLIENT_PREALLOCATE=false \
                 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_unet.py \
                 -k 'tokamax or bfloat16_at_sd15'; python3 -m tools.attention_bench --arch sd15 --batch 16 \
                 --out $SCRATCH/attention_sd15.json" ;;
    triton) step triton 90 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=true "${sd15[@]}" --reps 1 --no-stages \
              --out "$SCRATCH/bench_sd15_triton.json" ;;
    b32) step b32 75 python3 -m tools.bench --arch sd15 --batch-sizes 32 --steps 25 --reps 1 --no-stages \
           --out "$SCRATCH/bench_sd15_b32.json" ;;
    parity) step parity 150 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
              python3 -m pytest -q -p no:cacheprovider -n 4 -m parity -k "not tpu_attention" \
              tests/test_unet.py tests/test_vae.py tests/test_clip.py tests/test_geglu.py ;;
    geglu) step geglu 150 bash -c "JAX_PLATFORMS=cuda JAXDIFF_GEGLU=tokamax XLA_PYTHON_CLIENT_PREALLOCATE=false \
             python3 -m pytest -q -p no:cacheprovider tests/test_geglu.py tests/test_unet.py \
             -k 'fused_kernel or bfloat16_at_sd15'; python3 -m tools.kernel_bench --op geglu --arch sd15 \
             --batch 16 --out $SCRATCH/kernel_geglu_sd15.json" ;;
    tokamax) end_to_end tokamax JAXDIFF_GEGLU=tokamax ;;
    norm) step norm 200 bash -c "JAX_PLATFORMS=cuda JAXDIFF_LAYER_NORM=pallas JAXDIFF_GROUP_NORM=pallas \
            XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -p no:cacheprovider tests/test_layer_norm.py \
            tests/test_group_norm.py tests/test_unet.py -k 'compiled_kernel or bfloat16_at_sd15'; \
            python3 -m tools.kernel_bench --op layer_norm --arch sd15 --batch 16 \
            --out $SCRATCH/kernel_layer_norm_sd15.json; python3 -m tools.kernel_bench --op group_norm \
            --arch sd15 --batch 16 --out $SCRATCH/kernel_group_norm_sd15.json" ;;
    upsample) step upsample 60 python3 -m tools.kernel_bench --op upsample --arch sd15 --batch 16 \
                --out "$SCRATCH/kernel_upsample_sd15.json" ;;
    ln) end_to_end ln JAXDIFF_LAYER_NORM=pallas ;;
    gn) end_to_end gn JAXDIFF_GROUP_NORM=pallas ;;
    fused) end_to_end fused "${fused[@]}" ;;
    variants) step variants 420 env JAXDIFF_CACHE_DIR="$(mktemp -d)" "${sd15[@]}" --reps 3 --no-stages \
                --variants none,fused,gn,tokamax,ln,attn,all --out "$SCRATCH/bench_sd15_variants.json" ;;
    hlo) step hlo 60 python3 -m tools.step_hlo --arch sd15 --batch 16 --target local --out "$SCRATCH/step_hlo_sd15.json" \
           --hlo-out "$SCRATCH/sd15_step_hlo.txt" ;;
  esac
}
for s in "${steps[@]}"; do run_step "$s"; done
