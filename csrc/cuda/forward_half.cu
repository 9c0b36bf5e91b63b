// The forward kernels for c10::Half weights (bodies in forward.cuh).
#include "cuda/forward.cuh"

BSN_INSTANTIATE_FORWARD(c10::Half)
