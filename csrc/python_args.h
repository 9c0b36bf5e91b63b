// What the _C module's fast entry points (python_api.cpp, group_python.cpp)
// share: conversion of exact Python ints/floats/bools, and the sigma-log write.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bsn {
namespace py {

// false (no exception set) when obj has another type, so that the caller
// returns None and bsn_cuda/_ops.py takes the general torch.ops path.
inline bool to_int(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  out = PyLong_AsLongLong(obj);
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

inline bool to_double(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  int64_t i = 0;
  if (!to_int(obj, i)) return false;
  out = static_cast<double>(i);
  return true;
}

inline bool to_bool(PyObject* obj, bool& out) {
  if (!PyBool_Check(obj)) return false;
  out = obj == Py_True;
  return true;
}

// log[i] = state[min(i, header - 1)]: the sigmas of the state's header, with a
// one-sigma header broadcast (BSN's log of a single-matricization weight).
// Defined in python_api.cpp.
void write_log(at::Tensor& log, const at::Tensor& state, int64_t header);

}  // namespace py
}  // namespace bsn
