#include "host.h"

#include <cmath>
#include <string>

namespace bsn {
namespace {

// A dtype as Python prints it ("torch.float32"), which is how users name it
// (at::ScalarType alone prints "Float"), as bsn_cuda/_contract.py words it.
// A local table rather than c10::getDtypeNames, which older torch (setup.py
// allows 2.4) may lack in c10.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::ScalarType::Float8_e5m2: return "torch.float8_e5m2";
    case at::ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
    default: return c10::toString(dtype);  // rarer dtypes: the C++ name
  }
}

void check_weight(const char* op, const at::Tensor& weight, int64_t min_dim) {
  TORCH_CHECK(weight.defined(), op, ": expected weight to be a tensor, got None");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(is_kernel_dtype(dtype), op,
              ": expected weight of dtype float32, float64, float16 or bfloat16, got ",
              dtype_name(dtype));
  TORCH_CHECK(weight.dim() >= min_dim, op, ": expected weight with at least ", min_dim,
              " dimensions, got ", weight.dim(), " (shape ", weight.sizes(), ")");
  TORCH_CHECK(weight.numel() > 0, op, ": expected a non-empty weight, got shape ",
              weight.sizes());
}

void check_vector(const char* op, const char* name, const at::Tensor& vec,
                  const at::Tensor& weight, int64_t expected_size, const char* what) {
  TORCH_CHECK(vec.defined(), op, ": expected ", name, " to be a tensor, got None");
  TORCH_CHECK(vec.dim() == 1, op, ": expected ", name, " to be 1-D, got ", vec.dim(),
              "-D (shape ", vec.sizes(), ")");
  TORCH_CHECK(vec.size(0) == expected_size, op, ": expected ", name, " to have ",
              expected_size, " elements (", what, " of weight of shape ", weight.sizes(),
              "), got ", vec.size(0));
  TORCH_CHECK(vec.scalar_type() == weight.scalar_type(), op, ": expected ", name,
              " to have the weight's dtype ", dtype_name(weight.scalar_type()), ", got ",
              dtype_name(vec.scalar_type()));
  TORCH_CHECK(vec.device() == weight.device(), op, ": expected ", name,
              " on the weight's device ", weight.device(), ", got ", vec.device());
  TORCH_CHECK(vec.is_contiguous(), op, ": expected ", name,
              " to be contiguous, got strides ", vec.strides());
}

void check_hyper(const char* op, int64_t n_power_iterations, double eps, double scale) {
  TORCH_CHECK(n_power_iterations >= 1, op,
              ": expected n_power_iterations >= 1, got ", n_power_iterations);
  TORCH_CHECK(n_power_iterations <= (int64_t{1} << 30), op,
              ": expected n_power_iterations <= 2^30, got ", n_power_iterations);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": expected eps > 0 and finite, got ",
              eps);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op,
              ": expected scale > 0 and finite, got ", scale);
}

int64_t normalize_dim(const char* op, int64_t dim, int64_t ndim) {
  TORCH_CHECK(dim >= -ndim && dim < ndim, op, ": expected dim in [", -ndim, ", ",
              ndim - 1, "] for a weight with ", ndim, " dimensions, got ", dim);
  return dim < 0 ? dim + ndim : dim;
}

Matricization matricize(const at::Tensor& weight, int64_t dim) {
  Matricization mat;
  mat.outer = 1;
  mat.inner = 1;
  for (int64_t d = 0; d < dim; ++d) mat.outer *= weight.size(d);
  mat.rows = weight.size(dim);
  for (int64_t d = dim + 1; d < weight.dim(); ++d) mat.inner *= weight.size(d);
  return mat;
}

void check_state(const char* op, const at::Tensor& state, const at::Tensor& weight,
                 int64_t expected_size) {
  TORCH_CHECK(state.defined(), op, ": expected state to be a tensor, got None");
  const auto expected_dtype = acc_dtype(weight.scalar_type());
  TORCH_CHECK(state.dim() == 1 && state.size(0) == expected_size, op,
              ": expected state to be 1-D with ", expected_size,
              " elements (as returned by the forward), got shape ", state.sizes());
  TORCH_CHECK(state.scalar_type() == expected_dtype, op, ": expected state of dtype ",
              dtype_name(expected_dtype), ", got ", dtype_name(state.scalar_type()));
  TORCH_CHECK(state.device() == weight.device(), op,
              ": expected state on the weight's device ", weight.device(), ", got ",
              state.device());
  TORCH_CHECK(state.is_contiguous(), op, ": expected state to be contiguous, got strides ",
              state.strides());
}

void check_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& weight) {
  TORCH_CHECK(grad_out.defined(), op, ": expected grad_out to be a tensor, got None");
  TORCH_CHECK(grad_out.sizes() == weight.sizes(), op,
              ": expected grad_out of the weight's shape ", weight.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op,
              ": expected grad_out of the weight's dtype ", dtype_name(weight.scalar_type()),
              ", got ", dtype_name(grad_out.scalar_type()));
  TORCH_CHECK(grad_out.device() == weight.device(), op,
              ": expected grad_out on the weight's device ", weight.device(), ", got ",
              grad_out.device());
}

// The variant arguments, after the op's other checks (bsn_cuda/_contract.py check_variant).
void check_variant(const char* op, const at::Tensor& weight, double coeff, const OptTensor& gamma,
                   bool track_only) {
  TORCH_CHECK(std::isfinite(coeff) && coeff >= 0, op, ": expected coeff >= 0 and finite, got ",
              coeff);
  if (gamma.has_value() && gamma->defined()) {
    TORCH_CHECK(gamma->numel() == 1, op, ": expected gamma to have 1 element, got shape ",
                gamma->sizes());
    const auto expected_dtype = acc_dtype(weight.scalar_type());
    TORCH_CHECK(gamma->scalar_type() == expected_dtype, op, ": expected gamma of dtype ",
                dtype_name(expected_dtype), " (the accumulation dtype), got ",
                dtype_name(gamma->scalar_type()));
    TORCH_CHECK(gamma->device() == weight.device(), op,
                ": expected gamma on the weight's device ", weight.device(), ", got ",
                gamma->device());
  }
  const bool has_gamma = gamma.has_value() && gamma->defined();
  TORCH_CHECK(!track_only || (coeff == 0 && !has_gamma), op,
              ": expected coeff=0 and gamma=None with track_only=True, got coeff=", coeff,
              ", gamma=", has_gamma ? "a tensor" : "None");
}

const void* gamma_ptr(const OptTensor& gamma) {
  return gamma.has_value() && gamma->defined() ? gamma->data_ptr() : nullptr;
}

// The two matricizations of BSN: [c_out, c_in * k] and [c_in, c_out * k].
void bsn_matricizations(const at::Tensor& weight, Matricization* mat) {
  mat[0] = matricize(weight, 0);
  mat[1] = matricize(weight, 1);
}

PreparedForward allocate_forward(const at::Tensor& weight, int num_pairs,
                                 const Matricization* mat, bool track_only) {
  PreparedForward prep;
  prep.weight = weight.contiguous();
  // Track-only: no output pass, an empty `out` (the caller returns the weight).
  prep.out = track_only ? at::empty({0}, weight.options())
                        : at::empty(weight.sizes(),
                                    weight.options().memory_format(at::MemoryFormat::Contiguous));
  prep.state = at::empty({state_size(mat, num_pairs)},
                         weight.options().dtype(acc_dtype(weight.scalar_type())));
  auto& p = prep.params;
  p.weight = prep.weight.data_ptr();
  p.out = track_only ? nullptr : prep.out.data_ptr();
  p.track_only = track_only;
  p.state = prep.state.data_ptr();
  p.numel = weight.numel();
  p.num_pairs = num_pairs;
  for (int k = 0; k < num_pairs; ++k) p.mat[k] = mat[k];
  return prep;
}

PreparedBackward allocate_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                   const at::Tensor& state, int num_pairs,
                                   const Matricization* mat, double scale, double coeff,
                                   const OptTensor& gamma) {
  PreparedBackward prep;
  prep.grad_out = grad_out.contiguous();
  prep.weight = weight.contiguous();
  prep.grad_weight =
      at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  auto& p = prep.params;
  p.grad_out = prep.grad_out.data_ptr();
  p.weight = prep.weight.data_ptr();
  p.state = state.data_ptr();
  p.grad_weight = prep.grad_weight.data_ptr();
  p.numel = weight.numel();
  p.num_pairs = num_pairs;
  for (int k = 0; k < num_pairs; ++k) p.mat[k] = mat[k];
  p.scale = scale;
  p.coeff = coeff;
  p.gamma = gamma_ptr(gamma);
  return prep;
}

}  // namespace

bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

at::ScalarType acc_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

PreparedForward prepare_sn_forward(const at::Tensor& weight, const at::Tensor& u,
                                   const at::Tensor& v, int64_t dim,
                                   int64_t n_power_iterations, double eps,
                                   double scale, bool update, double coeff,
                                   const OptTensor& gamma, bool track_only) {
  constexpr const char* op = "bsn_cuda::sn_forward";
  check_weight(op, weight, 2);
  dim = normalize_dim(op, dim, weight.dim());
  check_hyper(op, n_power_iterations, eps, scale);
  Matricization mat[1] = {matricize(weight, dim)};
  check_vector(op, "u", u, weight, mat[0].rows, "size(dim)");
  check_vector(op, "v", v, weight, mat[0].cols(), "numel / size(dim)");
  check_variant(op, weight, coeff, gamma, track_only);
  PreparedForward prep = allocate_forward(weight, 1, mat, track_only);
  auto& p = prep.params;
  p.u[0] = u.data_ptr();
  p.v[0] = v.data_ptr();
  p.n_power_iterations = static_cast<int>(n_power_iterations);
  p.eps = eps;
  p.scale = scale;
  p.update = update;
  p.coeff = coeff;
  p.gamma = gamma_ptr(gamma);
  return prep;
}

PreparedForward prepare_bsn_forward(const at::Tensor& weight, const at::Tensor& u0,
                                    const at::Tensor& v0, const at::Tensor& u1,
                                    const at::Tensor& v1, int64_t n_power_iterations,
                                    double eps, double scale, bool update, double coeff,
                                    const OptTensor& gamma, bool track_only) {
  constexpr const char* op = "bsn_cuda::bsn_forward";
  check_weight(op, weight, 3);
  check_hyper(op, n_power_iterations, eps, scale);
  Matricization mat[2];
  bsn_matricizations(weight, mat);
  check_vector(op, "u0", u0, weight, mat[0].rows, "size(0)");
  check_vector(op, "v0", v0, weight, mat[0].cols(), "numel / size(0)");
  check_vector(op, "u1", u1, weight, mat[1].rows, "size(1)");
  check_vector(op, "v1", v1, weight, mat[1].cols(), "numel / size(1)");
  check_variant(op, weight, coeff, gamma, track_only);
  PreparedForward prep = allocate_forward(weight, 2, mat, track_only);
  auto& p = prep.params;
  p.u[0] = u0.data_ptr();
  p.v[0] = v0.data_ptr();
  p.u[1] = u1.data_ptr();
  p.v[1] = v1.data_ptr();
  p.n_power_iterations = static_cast<int>(n_power_iterations);
  p.eps = eps;
  p.scale = scale;
  p.update = update;
  p.coeff = coeff;
  p.gamma = gamma_ptr(gamma);
  return prep;
}

PreparedBackward prepare_sn_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                     const at::Tensor& state, int64_t dim, double scale,
                                     double coeff, const OptTensor& gamma) {
  constexpr const char* op = "bsn_cuda::sn_backward";
  check_weight(op, weight, 2);
  dim = normalize_dim(op, dim, weight.dim());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op,
              ": expected scale > 0 and finite, got ", scale);
  check_grad(op, grad_out, weight);
  Matricization mat[1] = {matricize(weight, dim)};
  check_state(op, state, weight, state_size(mat, 1));
  check_variant(op, weight, coeff, gamma, false);
  return allocate_backward(grad_out, weight, state, 1, mat, scale, coeff, gamma);
}

PreparedBackward prepare_bsn_backward(const at::Tensor& grad_out,
                                      const at::Tensor& weight,
                                      const at::Tensor& state, double scale, double coeff,
                                      const OptTensor& gamma) {
  constexpr const char* op = "bsn_cuda::bsn_backward";
  check_weight(op, weight, 3);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op,
              ": expected scale > 0 and finite, got ", scale);
  check_grad(op, grad_out, weight);
  Matricization mat[2];
  bsn_matricizations(weight, mat);
  check_state(op, state, weight, state_size(mat, 2));
  check_variant(op, weight, coeff, gamma, false);
  return allocate_backward(grad_out, weight, state, 2, mat, scale, coeff, gamma);
}

}  // namespace bsn
