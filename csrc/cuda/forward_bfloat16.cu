// The forward kernels for c10::BFloat16 weights (bodies in forward.cuh).
#include "cuda/forward.cuh"

BSN_INSTANTIATE_FORWARD(c10::BFloat16)
