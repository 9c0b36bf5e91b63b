// The grouped kernels for half weights (bodies in group.cuh).
#include "cuda/group.cuh"

BSN_INSTANTIATE_GROUP(c10::Half)
