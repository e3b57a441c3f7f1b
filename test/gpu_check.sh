#!/usr/bin/env bash
# Verify torch_ep on a bare GPU machine: build, run every GPU test (2 ranks; 4-rank tests as 2 processes
# per GPU), the demo and the benchmarks, and end with a table of what passed. Exits non-zero if any step fails.
#   bash test/gpu_check.sh                      # everything
#   STEPS="build tests" bash test/gpu_check.sh  # a subset: build tests demo bench lowlat transport train
#   PYTEST_ARGS="-k four_ranks" BENCH_ARGS="--tokens 4096" bash test/gpu_check.sh
#   NPROC=4 bash test/gpu_check.sh            # demo and benchmarks with 4 ranks (a 4-GPU machine)
#   STEP_TIMEOUT=300 TIMEOUT_tests=600 bash test/gpu_check.sh   # seconds a step may take (TIMEOUT_<step> for one)
#   BASELINE=baseline.tar STEPS="build bench" bash test/gpu_check.sh   # also step "baseline": the same benchmark on
#     another tree, right after this one's on the same machine; make the tar in the repository root (untracked
#     files travel to the device): git archive REV csrc torch_ep setup.py pyproject.toml README.md > baseline.tar
# Logs and results go to $OUT when set (the device tool's output folder), else ./out.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The image's default CXX links libstdc++ statically into _C, which then crashes formatting c10 errors.
export CXX=/usr/bin/g++ CC=/usr/bin/gcc
steps=${STEPS:-build tests demo bench lowlat transport train memcheck}
mkdir -p "${OUT:-out}"
out=$(cd "${OUT:-out}" && pwd)  # absolute: the baseline steps run in another folder
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nproc=${NPROC:-2}  # ranks of the demo and the benchmarks
echo "== $(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs), torch $(python3 -c 'import torch; print(torch.__version__)')"

declare -A rc
run_step() {  # run_step NAME LOG COMMAND...: runs it if NAME is selected, keeps its exit code, shows its tail
  local name=$1 log=$2 limit_var="TIMEOUT_$1"
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name"
  local limit=${!limit_var:-${STEP_TIMEOUT:-0}}
  if [ "$limit" -gt 0 ]; then set -- timeout "$limit" "$@"; fi
  "$@" > "$out/$log" 2>&1
  rc[$name]=$?
  tail -${TAIL:-25} "$out/$log"
}

baseline_dir=/tmp/torch_ep_baseline
if [ -n "${BASELINE:-}" ] && [ "$ngpu" -ge 2 ]; then  # built in place, beside the steps below
  steps="$steps baseline"
  rm -rf "$baseline_dir" && mkdir -p "$baseline_dir" && tar -xf "$BASELINE" -C "$baseline_dir"
  (cd "$baseline_dir" && python3 setup.py build_ext --inplace > "$out/baseline_build.log" 2>&1) &
  baseline_build=$!
fi
run_step build build.log python3 -m pip install --no-build-isolation --no-deps -e .
if [ "${rc[build]:-0}" -ne 0 ]; then echo "== summary: build failed"; exit 1; fi
if [ "$ngpu" -lt 2 ]; then
  echo "only $ngpu GPU: both ranks share it (correctness only, no benchmark)"
  export TORCH_EP_SHARED_GPU=1
  steps=${steps//bench/}
fi
# shellcheck disable=SC2086
run_step tests gpu_tests.log python3 -m pytest -q -rs -m gpu test ${PYTEST_ARGS:-}
run_step demo demo.log torchrun --nproc-per-node $nproc -m torch_ep.demo
# shellcheck disable=SC2086
run_step bench bench.log torchrun --nproc-per-node $nproc -m torch_ep.bench --json "$out/bench.json" ${BENCH_ARGS:-}
if [ -n "${baseline_build:-}" ]; then
  # the baseline's in-place build comes first on the path when the bench runs from its folder
  if wait "$baseline_build"; then
    run_step baseline bench_baseline.log bash -c "cd $baseline_dir && torchrun --nproc-per-node $nproc -m torch_ep.bench ${BENCH_ARGS:-}"
  else
    echo "== baseline: build failed (log $out/baseline_build.log)"
    rc[baseline]=1
  fi
fi
# shellcheck disable=SC2086
run_step lowlat bench_low_latency.log torchrun --nproc-per-node $nproc -m torch_ep.bench --mode low-latency \
  --json "$out/bench_low_latency.json" ${BENCH_ARGS:-}
run_step transport bench_transport.log torchrun --nproc-per-node $nproc -m torch_ep.bench --transports --ranks-per-host 1
run_step train train.log torchrun --nproc-per-node $nproc -m torch_ep.examples.train --steps ${TRAIN_STEPS:-20} \
  --compare-nccl --out "$out/train"

# compute-sanitizer on a short 2-rank subset (SANITIZE_K picks it): memcheck finds out-of-bounds and misaligned
# accesses of every kernel, peer (CUDA IPC) memory included; racecheck and synccheck (opt-in: STEPS="racecheck
# synccheck") see shared-memory hazards and misused barriers inside a block only, not the cross-GPU flag protocol. Instrumented kernels run 10-100x
# slower, so the failure scenarios get a longer timeout_s. The kernels run in the pool's worker processes, whose
# findings do not reach pytest's exit code: pytest runs with -s so that every process's report lands in the
# log, each worker states whether the sanitizer is loaded in it, and the step passes only if every report is
# clean and at least two workers were instrumented.
sanitize_k=${SANITIZE_K:-"skewed or zero_tokens or float64 or fp8_dispatch or exact_mode or gpu_hot_expert or failure_is_raised"}
sanitize() {  # sanitize TOOL LOG
  local rc=0
  TORCH_EP_EXPECT_SANITIZER=1 TORCH_EP_FAILURE_TIMEOUT_S=30 compute-sanitizer --tool "$1" --target-processes all \
    --error-exitcode 9 --report-api-errors no --require-cuda-init no --launch-timeout 120 --print-limit ${PRINT_LIMIT:-50} \
    python3 -m pytest -s -q -x -m gpu test/test_cuda.py test/test_low_latency.py test/test_reliability_gpu.py \
    -k "$sanitize_k" || rc=$?
  # racecheck exits 9 on its expected hazards too (below); pytest's own failures show in its summary
  if [ "$rc" -ne 0 ] && { [ "$1" != racecheck ] || [ "$rc" -ne 9 ]; }; then return "$rc"; fi
  if grep -E "^[0-9]+ (passed|failed|errors?)\b.* in [0-9.]+s" "$2" | grep -qE "failed|error"; then return 1; fi
  local instrumented bare findings
  instrumented=$(grep -c "sanitizer loaded" "$2")
  bare=$(grep -c "sanitizer NOT loaded" "$2")
  findings=$(grep -cE "(ERROR|RACECHECK) SUMMARY: [1-9]" "$2")
  grep -hE "(ERROR|RACECHECK) SUMMARY" "$2" | sort | uniq -c
  if [ "$1" = racecheck ]; then
    # racecheck models barriers, not the CTA-scope release/acquire words that hand a stored chunk from the
    # sender warps to the signal warp (intranode.cuh: finish_unit, signal_steps): hazards between those
    # accesses are expected. A hazard anywhere else is a finding.
    grep -E "Race reported between|^=========     and " "$2" |
      grep -vE "access at (torch_ep::(ld_acquire_cta|st_release_cta)|__nanosleep|void torch_ep::(finish_unit|signal_steps)<)" |
      head -5
    findings=$(grep -E "Race reported between|^=========     and " "$2" |
      grep -cvE "access at (torch_ep::(ld_acquire_cta|st_release_cta)|__nanosleep|void torch_ep::(finish_unit|signal_steps)<)")
  fi
  echo "$1: $instrumented workers instrumented, $bare not, $findings reports with findings"
  [ "$findings" -eq 0 ] && [ "$bare" -eq 0 ] && [ "$instrumented" -ge 2 ]
}
export -f sanitize
export sanitize_k
for tool in memcheck racecheck synccheck; do
  run_step "$tool" "sanitize_$tool.log" bash -c "sanitize $tool $out/sanitize_$tool.log"
done

echo "== summary"
status=0
for name in build tests demo bench baseline lowlat transport train memcheck racecheck synccheck; do
  [ -n "${rc[$name]+x}" ] || continue
  printf '%-8s %s\n' "$name" "$([ "${rc[$name]}" -eq 0 ] && echo ok || echo "FAILED (rc=${rc[$name]}, log $out/)")"
  [ "${rc[$name]}" -eq 0 ] || status=1
done
exit $status
