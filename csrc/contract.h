// The element types the ep ops accept, named once for the CUDA checks
// (csrc/ops_cuda.cpp) and for Python (exported by csrc/python_module.cpp and
// read by torch_ep/_checks.py). The size limits live in runtime/layout.h.
#pragma once

#include <c10/core/ScalarType.h>

namespace torch_ep {

struct NamedType {
  c10::ScalarType type;
  const char* name;  // torch's name: getattr(torch, name) is the dtype
};

// x (unless FP8) and combine's y; summed in fp32 (fp64 for fp64).
constexpr NamedType kActivationTypes[] = {
    {c10::kBFloat16, "bfloat16"}, {c10::kHalf, "float16"}, {c10::kFloat, "float32"}, {c10::kDouble, "float64"}};
// FP8 x travels with one fp32 scale per kScaleBlock channels.
constexpr NamedType kFp8Type = {c10::kFloat8_e4m3fn, "float8_e4m3fn"};
constexpr NamedType kScaleType = {c10::kFloat, "float32"};
// topk_idx and the op-level topk_weights (Buffer.dispatch converts bf16/fp16 weights to fp32).
constexpr NamedType kTopkIdxType = {c10::kLong, "int64"};
constexpr NamedType kTopkWeightType = {c10::kFloat, "float32"};

inline bool is_activation_type(c10::ScalarType type) {
  for (const NamedType& t : kActivationTypes) {
    if (t.type == type) return true;
  }
  return false;
}

}  // namespace torch_ep
