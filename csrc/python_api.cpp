// The bsn_cuda._C module: importing it loads this library (and with it the op
// registrations), and it offers fast entry points for eager calls.
//
// Why: a call through torch.ops.bsn_cuda.<op> parses its arguments against the
// schema, boxes them and looks for __torch_function__ overrides, which on
// small layers costs more than the fused kernel. `sn_forward` / `bsn_forward`
// here call the same op through the same dispatcher (so autograd, inference
// mode, the profiler, tracing and __torch_dispatch__ modes behave the same),
// but with the argument types fixed, and also write the sigma log. They
// return None when a call needs the general path: a Tensor subclass with
// __torch_function__, an active torch function mode, a device without a
// kernel, or arguments of unexpected Python types. bsn_cuda/_ops.py then calls
// torch.ops as before.
#include <Python.h>

#include "autograd.h"
#include "host.h"
#include "python_args.h"

#include <ATen/Dispatch.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace bsn {

void py::write_log(at::Tensor& log, const at::Tensor& state, int64_t header) {
  const int64_t n = log.numel();
  if (log.device().is_cpu() && state.device().is_cpu() && log.scalar_type() == state.scalar_type() &&
      log.is_contiguous() && n <= 3) {
    AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "bsn_cuda: sigma log", [&] {
      const scalar_t* src = state.const_data_ptr<scalar_t>();
      scalar_t* dst = log.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = src[std::min(i, header - 1)];
    });
    if (!log.is_inference()) log.unsafeGetTensorImpl()->bump_version();
  } else {
    log.copy_(state.narrow(0, 0, header));
  }
}

namespace {

using py::to_bool;
using py::to_double;
using py::to_int;
using py::write_log;

using ForwardResult = std::tuple<at::Tensor, at::Tensor>;

// Releases the GIL for the op, as torch's own op calls do (a kernel may run
// for milliseconds); dispatcher callbacks into Python take it back.
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ~ReleaseGil() { PyEval_RestoreThread(state_); }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

bool has_kernel(const at::Tensor& weight) {
  const auto type = weight.device().type();
#ifdef BSN_WITH_CUDA
  return type == c10::DeviceType::CPU || type == c10::DeviceType::CUDA;
#else
  return type == c10::DeviceType::CPU;
#endif
}

// The variant arguments (coeff, gamma, track_only) after the log, when given;
// false for a type that needs the general path.
bool to_variant(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t first, double& coeff,
                std::optional<at::Tensor>& gamma, bool& track_only) {
  if (nargs == first) return true;
  if (!to_double(args[first], coeff) || !to_bool(args[first + 2], track_only)) return false;
  PyObject* g = args[first + 1];
  if (g == Py_None) return true;
  if (!plain_tensor(g)) return false;
  gamma = THPVariable_Unpack(g);
  return true;
}

PyObject* wrap_result(ForwardResult&& result) {
  PyObject* out = THPVariable_Wrap(std::move(std::get<0>(result)));
  if (!out) return nullptr;
  PyObject* state = THPVariable_Wrap(std::move(std::get<1>(result)));
  if (!state) {
    Py_DECREF(out);
    return nullptr;
  }
  PyObject* tuple = PyTuple_Pack(2, out, state);
  Py_DECREF(out);
  Py_DECREF(state);
  return tuple;
}

// sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, log
//            [, coeff, gamma, track_only])
PyObject* fast_sn_forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 && nargs != 12) {
    PyErr_Format(PyExc_TypeError, "bsn_cuda._C.sn_forward: expected 9 or 12 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  const bool with_log = args[8] != Py_None;
  if (!plain_tensor(args[0]) || !plain_tensor(args[1]) || !plain_tensor(args[2]) ||
      (with_log && !plain_tensor(args[8])) || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NONE;
  }
  int64_t dim = 0, iters = 0;
  double eps = 0, scale = 0;
  bool update = false;
  if (!to_int(args[3], dim) || !to_int(args[4], iters) || !to_double(args[5], eps) ||
      !to_double(args[6], scale) || !to_bool(args[7], update)) {
    Py_RETURN_NONE;
  }
  double coeff = 0;
  std::optional<at::Tensor> gamma;
  bool track_only = false;
  if (!to_variant(args, nargs, 9, coeff, gamma, track_only)) Py_RETURN_NONE;
  const at::Tensor& weight = THPVariable_Unpack(args[0]);
  if (!has_kernel(weight)) Py_RETURN_NONE;
  at::Tensor u = THPVariable_Unpack(args[1]);
  at::Tensor v = THPVariable_Unpack(args[2]);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::sn_forward", "")
                       .typed<ForwardResult(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t,
                                            int64_t, double, double, bool, double,
                                            const std::optional<at::Tensor>&, bool)>();
  ForwardResult result;
  {
    ReleaseGil no_gil;
    result = op.call(weight, u, v, dim, iters, eps, scale, update, coeff, gamma, track_only);
    if (with_log) {
      at::Tensor log = THPVariable_Unpack(args[8]);
      write_log(log, std::get<1>(result), 1);
    }
  }
  return wrap_result(std::move(result));
  END_HANDLE_TH_ERRORS
}

// bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log
//             [, coeff, gamma, track_only])
PyObject* fast_bsn_forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10 && nargs != 13) {
    PyErr_Format(PyExc_TypeError, "bsn_cuda._C.bsn_forward: expected 10 or 13 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  const bool with_log = args[9] != Py_None;
  for (int i = 0; i < 5; ++i) {
    if (!plain_tensor(args[i])) Py_RETURN_NONE;
  }
  if ((with_log && !plain_tensor(args[9])) || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NONE;
  }
  int64_t iters = 0;
  double eps = 0, scale = 0;
  bool update = false;
  if (!to_int(args[5], iters) || !to_double(args[6], eps) || !to_double(args[7], scale) ||
      !to_bool(args[8], update)) {
    Py_RETURN_NONE;
  }
  double coeff = 0;
  std::optional<at::Tensor> gamma;
  bool track_only = false;
  if (!to_variant(args, nargs, 10, coeff, gamma, track_only)) Py_RETURN_NONE;
  const at::Tensor& weight = THPVariable_Unpack(args[0]);
  if (!has_kernel(weight)) Py_RETURN_NONE;
  at::Tensor u0 = THPVariable_Unpack(args[1]);
  at::Tensor v0 = THPVariable_Unpack(args[2]);
  at::Tensor u1 = THPVariable_Unpack(args[3]);
  at::Tensor v1 = THPVariable_Unpack(args[4]);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::bsn_forward", "")
                       .typed<ForwardResult(const at::Tensor&, at::Tensor&, at::Tensor&,
                                            at::Tensor&, at::Tensor&, int64_t, double, double,
                                            bool, double, const std::optional<at::Tensor>&,
                                            bool)>();
  ForwardResult result;
  {
    ReleaseGil no_gil;
    result = op.call(weight, u0, v0, u1, v1, iters, eps, scale, update, coeff, gamma, track_only);
    if (with_log) {
      at::Tensor log = THPVariable_Unpack(args[9]);
      write_log(log, std::get<1>(result), 3);
    }
  }
  return wrap_result(std::move(result));
  END_HANDLE_TH_ERRORS
}

// sn_forward_transposed(weight, u, v, n_power_iterations, eps, scale, update):
// torch's legacy (v-first) order, see csrc/autograd.h.
PyObject* fast_sn_forward_transposed(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_Format(PyExc_TypeError, "bsn_cuda._C.sn_forward_transposed: expected 7 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  if (!plain_tensor(args[0]) || !plain_tensor(args[1]) || !plain_tensor(args[2]) ||
      at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NONE;
  }
  int64_t iters = 0;
  double eps = 0, scale = 0;
  bool update = false;
  if (!to_int(args[3], iters) || !to_double(args[4], eps) || !to_double(args[5], scale) ||
      !to_bool(args[6], update)) {
    Py_RETURN_NONE;
  }
  const at::Tensor& weight = THPVariable_Unpack(args[0]);
  // Dtypes without a kernel (complex: torch's own computation) take the general path.
  if (!has_kernel(weight) || weight.dim() < 1 || !is_kernel_dtype(weight.scalar_type())) {
    Py_RETURN_NONE;
  }
  at::Tensor u = THPVariable_Unpack(args[1]);
  at::Tensor v = THPVariable_Unpack(args[2]);
  ForwardResult result;
  {
    ReleaseGil no_gil;
    result = sn_forward_transposed(weight, u, v, iters, eps, scale, update);
  }
  return wrap_result(std::move(result));
  END_HANDLE_TH_ERRORS
}

}  // namespace
// csrc/group_python.cpp
PyObject* fast_group_forward(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
namespace {

PyMethodDef methods[] = {
    {"sn_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_sn_forward)),
     METH_FASTCALL, "Eager entry point of bsn_cuda::sn_forward (see csrc/python_api.cpp)."},
    {"bsn_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_bsn_forward)),
     METH_FASTCALL, "Eager entry point of bsn_cuda::bsn_forward (see csrc/python_api.cpp)."},
    {"sn_forward_transposed",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_sn_forward_transposed)),
     METH_FASTCALL, "bsn_cuda::sn_forward in torch's legacy (v-first) order (see csrc/autograd.h)."},
    {"group_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_group_forward)),
     METH_FASTCALL, "Eager entry point of bsn_cuda::group_forward (see csrc/group_python.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "bsn_cuda's compiled ops (see torch.ops.bsn_cuda) and their fast entry points",
                          -1, methods};

}  // namespace
}  // namespace bsn

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&bsn::module_def); }
