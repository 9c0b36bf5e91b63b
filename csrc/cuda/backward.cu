// The backward kernels for the four dtypes (bodies in backward.cuh).
#include "cuda/backward.cuh"

namespace bsn {
namespace cuda {
template const void* backward_kernel<float>(BwdKernel);
template const void* backward_kernel<double>(BwdKernel);
template const void* backward_kernel<c10::Half>(BwdKernel);
template const void* backward_kernel<c10::BFloat16>(BwdKernel);
}  // namespace cuda
}  // namespace bsn
