// The grouped kernels for float weights (bodies in group.cuh).
#include "cuda/group.cuh"

BSN_INSTANTIATE_GROUP(float)
