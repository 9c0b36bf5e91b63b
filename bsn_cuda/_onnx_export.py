"""ONNX export of SN / BSN: the eval-mode formula in plain torch ops.

The fused ops (``bsn_cuda::sn_forward`` / ``bsn_forward``) have no ONNX
translation, and an ONNX graph cannot update the power-iteration vectors in
place. While ``torch.onnx.export`` traces a model (both exporters: the
TorchScript one, ``dynamo=False``, and ``dynamo=True``, under which
``torch.onnx.is_in_onnx_export()`` is True as well), the parametrizations call
the functions below instead: ``sigma = u^T W_mat v`` with the stored vectors
(buffers, so they become initializers or folded constants) and
``out = W * (scale / sigma_eff)`` with the zero rule ``sigma == 0 -> 1``,
computed in the accumulation dtype (float64 for float64 weights, else float32)
as the fused op does. Only MatMul / Transpose / Reshape / Equal / Where / Mul /
Div / Cast are emitted; no ``vdot`` / ``dot`` (torch's own SN fails to export
on ``aten::vdot``).

Training mode cannot be exported: each training forward updates ``u``/``v``
in place, state that an ONNX graph (a pure function of its inputs) cannot
carry from one run to the next. :func:`check_eval` raises a RuntimeError that
says so. (The TorchScript exporter puts the model in eval mode by default,
``training=torch.onnx.TrainingMode.EVAL``; with ``dynamo=True`` call
``model.eval()`` first.)
"""

import sys

import torch

from . import reference
from ._context import is_compiling

__all__ = ["is_exporting", "check_eval", "eval_graph", "sn_eval_graph", "bsn_eval_graph", "vector_graph"]


def is_exporting():
    """True while ``torch.onnx.export`` traces the model (either exporter).

    Cheap when ONNX is not in use: export imports ``torch.onnx``, so until it
    is imported nothing is exporting (and importing it here would cost ~0.1 s).
    The exporter's own flag is read as well as ``is_in_onnx_export()``: dynamo
    folds the latter to False, and ``dynamo=True`` retries with a dynamo trace
    (``torch.export(strict=True)``) when the first trace fails.
    """
    modules = sys.modules
    if "torch.onnx" not in modules:
        return False
    # The exporters' flags, read directly (a plain is_in_onnx_export() call costs ~6 us, which
    # every SN forward would pay once torch.onnx is imported).
    flags = modules.get("torch.onnx._internal.exporter._flags")  # dynamo=True (torch >= 2.6)
    if flags is not None and getattr(flags, "_is_onnx_exporting", False):
        return True
    if is_compiling():  # dynamo traces no TorchScript export (and refuses to trace its GLOBALS)
        return False
    for name in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        state = modules.get(name)  # the TorchScript exporter's GLOBALS (new, old location)
        if state is not None and hasattr(state, "GLOBALS"):
            return bool(state.GLOBALS.in_onnx_export)
    return bool(torch.onnx.is_in_onnx_export())


def check_eval(training, what="spectral_norm"):
    """RuntimeError when a parametrization is exported in training mode (see the module doc)."""
    if training:
        raise RuntimeError(
            f"bsn_cuda {what}: ONNX export expected the module in eval mode, got training mode; "
            "a training forward updates the power-iteration vectors u/v in place, which an ONNX "
            "graph cannot keep between runs. Call model.eval() before torch.onnx.export"
        )


def _check_real(weight):
    if weight.is_complex():
        raise TypeError(
            f"bsn_cuda ONNX export: expected a real weight (float16/bfloat16/float32/float64), got {weight.dtype}; "
            "ONNX has no complex matrix products"
        )


def _sigma(w_mat, u, v):
    # u^T W_mat v as two MatMuls (no vdot/dot, which the TorchScript exporter lacks).
    return (u.unsqueeze(0) @ (w_mat @ v.unsqueeze(1))).reshape(())


def _scaled(weight, w_acc, sigma, scale):
    sigma_eff = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    return (w_acc * (scale / sigma_eff)).to(weight.dtype)


def sn_eval_graph(weight, u, v, dim, scale=1.0):
    """Eval-mode SN of a weight with ``ndim >= 2``: ``scale * W / sigma(W_mat(dim))`` in plain torch ops."""
    _check_real(weight)
    acc = reference.acc_dtype(weight.dtype)
    w_acc = weight.to(acc)
    w_mat = w_acc.movedim(dim, 0).reshape(weight.shape[dim], -1)
    return _scaled(weight, w_acc, _sigma(w_mat, u.to(acc), v.to(acc)), scale)


def bsn_eval_graph(weight, u0, v0, u1, v1, scale=1.0):
    """Eval-mode BSN of a weight with ``ndim >= 3``: ``scale * W / ((sigma_0 + sigma_1) / 2)``."""
    _check_real(weight)
    acc = reference.acc_dtype(weight.dtype)
    w_acc = weight.to(acc)
    sigma_0 = _sigma(w_acc.reshape(weight.shape[0], -1), u0.to(acc), v0.to(acc))
    sigma_1 = _sigma(w_acc.movedim(1, 0).reshape(weight.shape[1], -1), u1.to(acc), v1.to(acc))
    return _scaled(weight, w_acc, (sigma_0 + sigma_1) / 2, scale)


def vector_graph(weight, eps=1e-12, scale=1.0):
    """The 1-D case (no vectors): ``scale * W / max(||W||, eps)``."""
    return reference.normalize_vector(weight, eps, scale)


def eval_graph(norm, weight):
    """The eval formula of a bsn_cuda SN/BSN parametrization ``norm`` applied to ``weight``.

    Reads ``norm``'s buffers: ``_u``, ``_v`` and ``dim`` (SN); ``_u0``, ``_v0``,
    ``_u1``, ``_v1`` (BSN; ``_u0``/``_v0`` only: one matricization, SN along
    dim 0); none for 1-D weights. Also ``scale`` and ``eps``.
    """
    scale = getattr(norm, "scale", 1.0)
    if weight.ndim == 1:
        return vector_graph(weight, norm.eps, scale)
    buffers = norm._buffers
    if "_u1" in buffers:
        return bsn_eval_graph(weight, buffers["_u0"], buffers["_v0"], buffers["_u1"], buffers["_v1"], scale)
    if "_u0" in buffers:
        return sn_eval_graph(weight, buffers["_u0"], buffers["_v0"], 0, scale)
    return sn_eval_graph(weight, buffers["_u"], buffers["_v"], norm.dim, scale)
