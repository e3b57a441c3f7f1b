export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STEPS="build" TAIL=2 bash test/gpu_check.sh | tail -3
T="timeout 240 python3 -m pytest -q -x --timeout 100 -rs"
$T test/test_low_latency.py -m gpu 2>&1 | tail -25 > $OUT/ll.log; tail -25 $OUT/ll.log
$T test/test_training.py -m gpu 2>&1 | tail -25 > $OUT/train.log; tail -25 $OUT/train.log
$T test/test_cuda.py -k "not 16384 and not four" 2>&1 | tail -5
B="torchrun --nproc-per-node 2 -m torch_ep.bench"
timeout 120 $B --mode low-latency --ll-num-sms 24 132 2>&1 | grep -v Warn | tail -22
timeout 60 $B --tokens 4096 --num-sms 24 --iters 30 2>&1 | grep -E "^4096|ceiling|FP8"
