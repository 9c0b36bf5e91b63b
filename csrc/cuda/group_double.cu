// The grouped kernels for double weights (bodies in group.cuh).
#include "cuda/group.cuh"

BSN_INSTANTIATE_GROUP(double)
