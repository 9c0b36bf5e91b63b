// The forward kernels for double weights (bodies in forward.cuh).
#include "cuda/forward.cuh"

BSN_INSTANTIATE_FORWARD(double)
