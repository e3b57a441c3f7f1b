// The `_C` Python module: buffer management for torch_ep.Buffer and the
// peer-copy benchmark, and the op contract's constants and element types
// (read by torch_ep/_checks.py). Importing it also loads the op registrations
// linked into the same library. In the CPU-only build only buffer_bytes works.
#include <torch/extension.h>

#include "contract.h"
#include "runtime/layout.h"
#include "runtime/python_module.h"

namespace torch_ep {

int64_t buffer_bytes(int64_t num_ranks, int64_t num_experts, int64_t hidden, int64_t max_tokens_per_rank,
                     bool low_latency, bool zero_copy_recv, bool zero_copy_combine) {
  return make_buffer_layout(num_ranks, num_experts, hidden, max_tokens_per_rank, low_latency, zero_copy_recv,
                            zero_copy_combine)
      .total_bytes;
}

}  // namespace torch_ep

namespace {

template <size_t N>
py::tuple type_names(const c10::ScalarType (&types)[N]) {
  py::list names;
  for (const auto t : types) names.append(torch_ep::type_name(t));
  return py::tuple(names);
}

// Compute capabilities (major * 10 + minor) the CUDA kernels were compiled for, and the
// one whose PTX is embedded (0: none); setup.py defines both from TORCH_CUDA_ARCH_LIST.
#ifndef TORCH_EP_CUDA_ARCHS
#define TORCH_EP_CUDA_ARCHS
#define TORCH_EP_CUDA_PTX_ARCH 0
#endif
py::tuple cuda_archs() {
  const std::vector<int> archs = {TORCH_EP_CUDA_ARCHS};
  return py::tuple(py::cast(archs));
}

#ifdef TORCH_EP_CUDA
constexpr bool kWithCuda = true;

py::bytes create_buffer(const std::string& name, int64_t device, int64_t rank, int64_t num_ranks,
                        int64_t num_experts, int64_t hidden, int64_t max_tokens_per_rank, int64_t num_bytes,
                        int64_t num_sms, double timeout_s, bool low_latency, bool zero_copy_recv,
                        bool zero_copy_combine, int64_t low_latency_num_sms) {
  return py::bytes(torch_ep::create_buffer(name, device, rank, num_ranks, num_experts, hidden, max_tokens_per_rank,
                                           num_bytes, num_sms, timeout_s, low_latency, zero_copy_recv,
                                           zero_copy_combine, low_latency_num_sms));
}

void open_buffer(const std::string& name, const std::vector<py::bytes>& handles) {
  std::vector<std::string> raw(handles.begin(), handles.end());
  torch_ep::open_buffer(name, raw);
}

using torch_ep::check_buffer;
using torch_ep::close_buffer;
using torch_ep::combine_input;
using torch_ep::free_buffer;
using torch_ep::peer_copy;
using torch_ep::refuse_dispatch;
using torch_ep::take_trace;
#else
constexpr bool kWithCuda = false;

[[noreturn]] void no_cuda() { throw std::runtime_error("torch_ep was built without CUDA"); }

py::bytes create_buffer(const std::string&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        double, bool, bool, bool, int64_t) {
  no_cuda();
}
void open_buffer(const std::string&, const std::vector<py::bytes>&) { no_cuda(); }
void close_buffer(const std::string&) { no_cuda(); }
void free_buffer(const std::string&) { no_cuda(); }
void check_buffer(const std::string&) { no_cuda(); }
at::Tensor combine_input(const std::string&, int64_t) { no_cuda(); }
void peer_copy(const std::string&, const at::Tensor&, int64_t) { no_cuda(); }
void refuse_dispatch(const std::string&, bool) { no_cuda(); }
at::Tensor take_trace(const std::string&) { no_cuda(); }
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_ep native module: communication buffers (the ep ops register on import)";
  m.attr("WITH_CUDA") = kWithCuda;
  m.attr("CUDA_ARCHS") = cuda_archs();
  m.attr("CUDA_PTX_ARCH") = TORCH_EP_CUDA_PTX_ARCH;
  m.attr("MAX_RANKS") = torch_ep::kMaxRanks;
  m.attr("MAX_DATA_BLOCKS") = torch_ep::kMaxDataBlocks;
  m.attr("MAX_TOPK") = torch_ep::kMaxTopk;
  m.attr("SCALE_BLOCK") = torch_ep::kScaleBlock;
  m.attr("ACTIVATION_DTYPES") = type_names(torch_ep::kActivationTypes);
  m.attr("FP8_DTYPE") = torch_ep::type_name(torch_ep::kFp8Type);
  m.attr("SCALE_DTYPE") = torch_ep::type_name(torch_ep::kScaleType);
  m.attr("TOPK_IDX_DTYPE") = torch_ep::type_name(torch_ep::kTopkIdxType);
  m.attr("TOPK_WEIGHT_DTYPE") = torch_ep::type_name(torch_ep::kTopkWeightType);
  m.def("buffer_bytes", &torch_ep::buffer_bytes, "Bytes of device memory one rank's buffer needs.",
        py::arg("num_ranks"), py::arg("num_experts"), py::arg("hidden"), py::arg("max_tokens_per_rank"),
        py::arg("low_latency") = false, py::arg("zero_copy_recv") = false, py::arg("zero_copy_combine") = false);
  m.def("create_buffer", &create_buffer,
        "Allocate and zero this rank's buffer on `device`, register it as `name`; returns its CUDA IPC handle.",
        py::arg("name"), py::arg("device"), py::arg("rank"), py::arg("num_ranks"), py::arg("num_experts"),
        py::arg("hidden"), py::arg("max_tokens_per_rank"), py::arg("num_bytes"), py::arg("num_sms"),
        py::arg("timeout_s"), py::arg("low_latency") = false, py::arg("zero_copy_recv") = false,
        py::arg("zero_copy_combine") = false, py::arg("low_latency_num_sms") = 0);
  m.def("combine_input", &combine_input,
        "uint8 [num_rows, 2 * hidden]: this rank's combine region (zero_copy_combine), for combine's y.",
        py::arg("name"), py::arg("num_rows"));
  m.def("open_buffer", &open_buffer, "Map every peer's buffer; handles[r] is rank r's IPC handle (own included).",
        py::arg("name"), py::arg("handles"));
  m.def("close_buffer", &close_buffer, "Unmap the peers' buffers (call on every rank, then barrier, then free).",
        py::arg("name"));
  m.def("free_buffer", &free_buffer, "Free this rank's buffer memory and forget `name`.", py::arg("name"));
  m.def("check_buffer", &check_buffer,
        "Wait for the buffer's device, then raise the error of any op that failed on it.", py::arg("name"));
  m.def("peer_copy", &peer_copy,
        "Benchmark ceiling: write all of src (contiguous uint8, CUDA) into every peer's data region with num_sms "
        "blocks, on the current stream.",
        py::arg("name"), py::arg("src"), py::arg("num_sms"));
  m.def("refuse_dispatch", &refuse_dispatch,
        "Buffer.dispatch refused this rank's arguments before the op: tell the peers through the call's notify "
        "kernel (they reject the call too).",
        py::arg("name"), py::arg("exact"));
  m.def("take_trace", &take_trace,
        "Profiling: the kernels' phase timestamps since the last call (int64 ns [blocks, events], 0: none), "
        "then clears them; needs TORCH_EP_TRACE=1 when the buffer is built.",
        py::arg("name"));
}
