// The element types the ep ops accept, named once for the CUDA checks
// (csrc/ops_cuda.cpp) and for Python (exported by csrc/python_module.cpp and
// read by torch_ep/_checks.py). The size limits live in runtime/layout.h.
#pragma once

#include <c10/core/ScalarType.h>

namespace torch_ep {

// x (unless FP8) and combine's y; summed in fp32 (fp64 for fp64).
constexpr c10::ScalarType kActivationTypes[] = {c10::kBFloat16, c10::kHalf, c10::kFloat, c10::kDouble};
// FP8 x travels with one fp32 scale per kScaleBlock channels.
constexpr c10::ScalarType kFp8Type = c10::kFloat8_e4m3fn;
constexpr c10::ScalarType kScaleType = c10::kFloat;
// topk_idx, and topk_weights as the ops take them (Buffer.dispatch converts bf16/fp16 weights to fp32).
constexpr c10::ScalarType kTopkIdxType = c10::kLong;
constexpr c10::ScalarType kTopkWeightType = c10::kFloat;

inline bool is_activation_type(c10::ScalarType type) {
  for (const c10::ScalarType t : kActivationTypes) {
    if (t == type) return true;
  }
  return false;
}

// torch's name of a dtype ("bfloat16", "int32": getattr(torch, name) is the dtype), which every
// error message prints, on every path.
inline const char* type_name(c10::ScalarType type) {
  switch (type) {
    case c10::kBFloat16: return "bfloat16";
    case c10::kHalf: return "float16";
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kFloat8_e4m3fn: return "float8_e4m3fn";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kShort: return "int16";
    case c10::kChar: return "int8";
    case c10::kByte: return "uint8";
    case c10::kBool: return "bool";
    default: return c10::toString(type);
  }
}

}  // namespace torch_ep
