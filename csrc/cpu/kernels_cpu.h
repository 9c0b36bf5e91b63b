// CPU kernels of the fused ops (definitions in kernels_cpu.cpp, instantiated
// for float, double, c10::Half and c10::BFloat16).
#pragma once

#include "bsn.h"

namespace bsn {
namespace cpu {

template <typename scalar_t>
void forward(const ForwardParams& params);

template <typename scalar_t>
void backward(const BackwardParams& params);

}  // namespace cpu
}  // namespace bsn
