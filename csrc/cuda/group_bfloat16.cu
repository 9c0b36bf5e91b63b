// The grouped kernels for bfloat16 weights (bodies in group.cuh).
#include "cuda/group.cuh"

BSN_INSTANTIATE_GROUP(c10::BFloat16)
