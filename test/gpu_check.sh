#!/usr/bin/env bash
# Verify torch_ep on a bare GPU machine: build, run the GPU tests (2 ranks), run the benchmark,
# end with its table. Usage: bash test/gpu_check.sh [extra bench args]
# Logs and results go to $OUT when set (the device tool's output folder), else ./out.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The image's default CXX links libstdc++ statically into _C, which then crashes formatting c10 errors.
export CXX=/usr/bin/g++ CC=/usr/bin/gcc
out=${OUT:-out}
mkdir -p "$out"
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "== $(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs), torch $(python3 -c 'import torch; print(torch.__version__)')"

echo "== build"
python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }

echo "== GPU tests"
if [ "$ngpu" -lt 2 ]; then
  echo "only $ngpu GPU: both ranks share it (correctness only, no benchmark)"
  export TORCH_EP_SHARED_GPU=1
fi
python3 -m pytest -q -rs test/test_cuda.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

bench_rc=0 demo_rc=0
if [ "$ngpu" -ge 2 ]; then
  echo "== demo (NCCL group, NVLink kernels)"
  torchrun --nproc-per-node 2 -m torch_ep.demo 2>&1 | tee "$out/demo.log" | tail -8
  demo_rc=${PIPESTATUS[0]}
  echo "== benchmark"
  torchrun --nproc-per-node 2 -m torch_ep.bench --json "$out/bench.json" --plot "$out/bench.png" "$@" \
    2>&1 | tee "$out/bench.log" | tail -20
  bench_rc=${PIPESTATUS[0]}
fi
echo "== summary: GPU tests rc=$tests_rc, demo rc=$demo_rc, benchmark rc=$bench_rc"
exit $(( tests_rc || demo_rc || bench_rc ))
