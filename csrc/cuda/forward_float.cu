// The forward kernels for float weights (bodies in forward.cuh).
#include "cuda/forward.cuh"

BSN_INSTANTIATE_FORWARD(float)
