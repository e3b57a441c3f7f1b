"""The benchmark's arithmetic (no ranks, no GPU): the ratios it prints for the issue bars."""
import pytest

from torch_ep import bench


def low_latency_times(**extra):
    times = {"dispatch_bf16": 20.0, "dispatch_fp8": 16.0, "combine": 18.0, "dispatch_bf16_of_10": 18.0,
             "dispatch_fp8_of_10": 15.0, "combine_of_10": 12.0, "one_kernel_graph": 5.0, "nccl_dispatch": 150.0,
             "nccl_combine": 54.0}
    times.update(extra)
    return times


def test_low_latency_speedups_compare_each_op_with_its_nccl_counterpart_and_symm_mem():
    s = bench.low_latency_speedups(low_latency_times(symm_mem_all_to_all_vdev=28.0))
    assert s["dispatch_bf16_vs_nccl"] == pytest.approx(7.5)
    assert s["dispatch_fp8_of_10_vs_nccl"] == pytest.approx(10.0)
    assert s["combine_vs_nccl"] == pytest.approx(3.0)  # combine against NCCL's combine, not its dispatch
    assert s["combine_of_10_vs_nccl"] == pytest.approx(4.5)
    assert s["dispatch_fp8_vs_symm_mem"] == pytest.approx(1.75)
    assert s["combine_of_10_vs_symm_mem"] == pytest.approx(28.0 / 12.0)
    assert len(s) == 12


def test_low_latency_speedups_leave_out_symm_mem_when_it_did_not_run(capsys):
    times = low_latency_times()
    s = bench.low_latency_speedups(times)
    assert not any(key.endswith("_vs_symm_mem") for key in s) and len(s) == 6
    bench.print_low_latency_table([{"tokens": 128, "buffer_tokens": 128, "num_sms": 132, "us": times,
                                    "speedup": s, "notes": ["symm_mem skipped"]}])
    printed = capsys.readouterr().out
    assert "128 tokens, 132 SMs: x nccl: dispatch_bf16 7.50 (8.33 of 10)" in printed
    assert "x symm_mem" not in printed
