#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one command on a
# lent device machine (an image with jax[cuda], flax, torch and timm, but not
# this project's other dependencies, and no network):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]
#   STEPS="kernels model" bash benchmarks/gpu_check.sh OUT_DIR   # some steps only
#
# WHEELS_DIR (default .whl) holds those other dependencies as wheels, fetched
# beforehand where a package index answers (docs/performance.md: "Running the
# GPU checks"). Each measurement writes OUT_DIR/<name>.json, the most wanted
# first, so a run cut short keeps what it finished. STEPS (default: all three)
# splits the run across calls: kernels ~1.5, model ~5.5, profile ~4 minutes on
# an H100 (limits 2, 7 and 4 minutes: kernels and model fit one 10-minute call).
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-.whl}
steps=" ${STEPS:-kernels model profile} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false HIERARCHICAL_VIT_TCMALLOC=0
if [ -d "$wheels" ]; then
  site=/tmp/hierarchical_vit_site
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
      "$wheels"/*.whl
  for sdist in "$wheels"/*.tar.gz; do
    [ -e "$sdist" ] && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
        --target "$site" "$sdist"
  done
  export PYTHONPATH="$site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
swin_t="--configs=swin_t_224 --gelu=erf --dtype=bfloat16 --batch=128"
# Each step is bounded, so that the steps after a stuck one still run.
failed=0
step() { local limit=$1; shift; timeout "$limit" "$@" || { echo "FAILED ($?): $*"; failed=1; }; }
# 1. The attention cores alone on Swin-T's stage shapes: the pallas kernel
#    (its error against the float32 einsum core) and its time against einsum's and cuDNN's.
if [[ $steps == *" kernels "* ]]; then
  step 120 python3 -m benchmarks.attention_core --config=swin_t_224 --dtype=bfloat16 \
      --cores=einsum_lowp --cores=pallas --cores=cudnn --output="$out/attention_cores.json"
fi
# 2. The model with the einsum core, bf16 logits (einsum_lowp) and the pallas kernel against
#    timm under torch.compile; pallas last, so that a crash of the untried kernel keeps the rest.
if [[ $steps == *" model "* ]]; then
  step 420 python3 -m benchmarks.throughput $swin_t --steps=10 --rounds=3 --attention=einsum \
      --attention=einsum_lowp --attention=pallas --timm_compile \
      --output="$out/attention_vs_timm_compiled.json"
fi
# 3. Where the train step's time goes, kernel by kernel, in ours (pallas core) and in compiled
#    timm. XLA replays the step as CUDA graphs unless command buffers are off: the trace would
#    show one op. Ours' trace and HLO are kept for offline reading.
#    Should the pallas step fail, the einsum one is profiled instead (timm's profile comes after
#    ours' in the same run).
if [[ $steps == *" profile "* ]]; then
  for attention in pallas einsum; do
    rm -rf /tmp/trace
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" step 240 \
        python3 -m benchmarks.step_profile --config=swin_t_224 --mode=train --gelu=erf \
        --dtype=bfloat16 --attention=$attention --steps=3 --timm --timm_compile --rows=40 \
        --output="$out/step_profile.json" --trace_out=/tmp/trace
    if [ -d /tmp/trace ]; then tar -C /tmp -czf "$out/step_trace.tar.gz" trace; fi
    [ -e "$out/step_profile.json" ] && break
  done
fi
exit $failed
