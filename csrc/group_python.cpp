// bsn_cuda._C.group_forward: the eager entry point of bsn_cuda::group_forward
// (registered in csrc/python_api.cpp's method table), for the same reason as
// the per-layer entry points there: a torch.ops call parses every list
// element against the schema. Same op, same dispatcher; it also writes the
// layers' sigma logs. Returns None (the caller then uses torch.ops) for a
// Tensor subclass, an active torch function mode or unexpected Python types.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "group.h"

namespace bsn {
namespace {

bool tensors_of(PyObject* list, std::vector<at::Tensor>& out) {
  if (!PyList_CheckExact(list)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    if (!THPVariable_CheckExact(item)) return false;
    out.push_back(THPVariable_Unpack(item));
  }
  return true;
}

template <typename T, typename Convert>
bool values_of(PyObject* list, std::vector<T>& out, const Convert& convert) {
  if (!PyList_CheckExact(list)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    T value;
    if (!convert(PyList_GET_ITEM(list, i), value)) return false;
    out.push_back(value);
  }
  return true;
}

bool as_int(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  out = PyLong_AsLongLong(obj);
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool as_double(PyObject* obj, double& out) {
  if (!PyFloat_CheckExact(obj)) return false;
  out = PyFloat_AS_DOUBLE(obj);
  return true;
}

bool as_bool(PyObject* obj, bool& out) {
  if (!PyBool_Check(obj)) return false;
  out = obj == Py_True;
  return true;
}

// log[:] = state[:header] broadcast over the log's length (a BSN log of an SN-kind layer).
void write_sigmas(at::Tensor& log, const at::Tensor& state, int64_t header) {
  const int64_t n = log.numel();
  if (log.is_cpu() && state.is_cpu() && log.scalar_type() == state.scalar_type() &&
      log.is_contiguous() && n <= 3 && (state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "bsn_cuda: group sigma log", [&] {
      const scalar_t* src = state.const_data_ptr<scalar_t>();
      scalar_t* dst = log.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i < header ? i : header - 1];
    });
    if (!log.is_inference()) log.unsafeGetTensorImpl()->bump_version();
  } else if (n == header) {
    log.copy_(state.narrow(0, 0, header));
  } else {
    log.copy_(state.narrow(0, 0, 1).expand({n}));
  }
}

PyObject* wrap_list(std::vector<at::Tensor>&& tensors) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(tensors.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* t = THPVariable_Wrap(std::move(tensors[i]));
    if (!t) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), t);
  }
  return list;
}

}  // namespace

// group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update, logs):
// lists; logs: None or one entry per layer (a sigma-log tensor or None).
PyObject* fast_group_forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9) {
    PyErr_Format(PyExc_TypeError, "bsn_cuda._C.group_forward: expected 9 arguments, got %zd", nargs);
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;
  std::vector<at::Tensor> weights, vectors;
  std::vector<int64_t> kinds, dims, iters;
  std::vector<double> eps, scales;
  std::vector<bool> update_flags;
  if (!tensors_of(args[0], weights) || !tensors_of(args[1], vectors) ||
      !values_of(args[2], kinds, as_int) || !values_of(args[3], dims, as_int) ||
      !values_of(args[4], iters, as_int) || !values_of(args[5], eps, as_double) ||
      !values_of(args[6], scales, as_double) || !values_of(args[7], update_flags, as_bool)) {
    Py_RETURN_NONE;
  }
  std::vector<at::Tensor> logs;
  PyObject* log_list = args[8];
  if (log_list != Py_None) {
    if (!PyList_CheckExact(log_list) || PyList_GET_SIZE(log_list) != static_cast<Py_ssize_t>(weights.size())) {
      Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(log_list); ++i) {
      PyObject* item = PyList_GET_ITEM(log_list, i);
      if (item == Py_None) {
        logs.emplace_back();
      } else if (THPVariable_CheckExact(item)) {
        logs.push_back(THPVariable_Unpack(item));
      } else {
        Py_RETURN_NONE;
      }
    }
  }
  c10::List<bool> update;
  update.reserve(update_flags.size());
  for (bool b : update_flags) update.push_back(b);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::group_forward", "")
                       .typed<GroupForwardResult(at::TensorList, at::TensorList, at::IntArrayRef,
                                                 at::IntArrayRef, at::IntArrayRef,
                                                 at::ArrayRef<double>, at::ArrayRef<double>,
                                                 const c10::List<bool>&)>();
  GroupForwardResult result;
  {
    PyThreadState* saved = PyEval_SaveThread();
    try {
      result = op.call(weights, vectors, kinds, dims, iters, eps, scales, update);
      const auto& states = std::get<1>(result);
      for (size_t i = 0; i < logs.size() && i < states.size(); ++i) {
        if (logs[i].defined()) write_sigmas(logs[i], states[i], kinds[i] == kGroupBSN ? 3 : 1);
      }
    } catch (...) {
      PyEval_RestoreThread(saved);
      throw;
    }
    PyEval_RestoreThread(saved);
  }
  PyObject* outs = wrap_list(std::move(std::get<0>(result)));
  if (!outs) return nullptr;
  PyObject* states = wrap_list(std::move(std::get<1>(result)));
  if (!states) {
    Py_DECREF(outs);
    return nullptr;
  }
  PyObject* tuple = PyTuple_Pack(2, outs, states);
  Py_DECREF(outs);
  Py_DECREF(states);
  return tuple;
  END_HANDLE_TH_ERRORS
}

}  // namespace bsn
