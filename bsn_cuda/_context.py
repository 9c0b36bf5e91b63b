"""What the parametrizations need to know about the call they run in.

* :func:`in_backward_pass`: a forward re-run by activation checkpointing inside
  the backward pass must not iterate the vectors again;
* :func:`is_plain_eager`: whether a call may take the eager-only shortcuts (the
  eval cache): not while torch.compile, torch.export or jit tracing records
  the call, nor under torch.func transforms or forward-mode AD (ONNX export is
  routed earlier, see :mod:`bsn_cuda._onnx_export`).

Each test is a few attribute reads: they run on every forward of every layer.
"""

import torch

_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
if _is_compiling is None:  # pragma: no cover - torch < 2.3

    def _is_compiling():
        return torch._dynamo.is_compiling()


is_compiling = _is_compiling

# torch.jit.is_tracing() without its Python wrapper (whose is_scripting() test is
# always False here: nothing of bsn_cuda is scripted); a tenth of a microsecond per call.
is_jit_tracing = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing

_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
if _functorch_active is None:  # pragma: no cover - older torch: ask the interpreter stack

    def _functorch_active():
        return torch._C._functorch.peek_interpreter_stack() is not None


from torch.autograd import forward_ad as _forward_ad  # noqa: E402


def forward_ad_active():
    """True inside ``torch.autograd.forward_ad.dual_level()`` (torch.func.jvp uses its own transform)."""
    return getattr(_forward_ad, "_current_level", -1) >= 0


def transforms_active():
    """True under torch.func transforms (grad, vmap, jvp, jacrev, ...) or forward-mode AD.

    The fused ops have no batching rule and no forward derivative; these calls
    run the differentiable pure-PyTorch path instead. Constant False while
    dynamo traces (so that compiled graphs keep the ops).
    """
    if _is_compiling():
        return False
    return eager_transforms_active()


def eager_transforms_active():
    """:func:`transforms_active` for callers that checked ``is_compiling()`` already."""
    return _functorch_active() or forward_ad_active()


def is_plain_eager():
    """Eager autograd-mode execution that no tracer records (see module docstring)."""
    return not (
        _is_compiling()
        or is_jit_tracing()
        or _functorch_active()
        or forward_ad_active()
    )


def in_backward_pass():
    """True while the autograd engine runs a backward pass (e.g. a checkpoint recomputation).

    Constant False while dynamo traces (torch.compile): no graph break, and a
    compiled graph recomputes functionally, applying the buffer update once.
    """
    if _is_compiling() or _current_graph_task_id is None:
        return False
    return _current_graph_task_id() != -1
