"""Exponential moving averages (EMA) of models with spectral normalization.

GAN generators are usually evaluated through an EMA of their weights. The
usual recipe averages the whole ``state_dict`` (StudioGAN's ``ema.py``,
``torch.optim.swa_utils.AveragedModel(use_buffers=True)``), which also
averages the power-iteration vectors ``u``/``v``: an average of unit vectors
is shorter than a unit vector, so the EMA model's ``sigma = u^T W v`` is
underestimated and its layers are scaled up.

Here parameters are averaged, while the vectors of every bsn_cuda SN/BSN layer
follow the *averaged* weight: each update runs ``n_power_iterations`` power
iterations on the EMA weight, warm-started from the EMA's own vectors (which
track it as the live model's vectors track the live weight). They stay unit
vectors (to rounding) and consistent with the weight they normalize. Other
buffers (BatchNorm statistics, torch SN vectors) are copied from the model.

    ema = EMA(generator, decay=0.999)
    ...
    optimizer.step()
    ema.update(generator)
    samples = ema(z)                       # the EMA model, in eval mode

or, with your own copy: ``update_ema(ema_model, model, decay)``. After
averaging vectors some other way (e.g. ``AveragedModel``), repair them with
``refresh_spectral_norm(ema_model)``.
"""

import copy
import numbers

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import check_int, check_module, check_positive_float
from .nn.parametrizations import PARAMETRIZATIONS as _PARAMETRIZATIONS

__all__ = ["EMA", "update_ema", "refresh_spectral_norm"]


def _unwrap(model):
    # DistributedDataParallel / DataParallel -> .module; torch.compile -> ._orig_mod
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_decay(decay):
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"expected decay to be a float, got {type(decay).__name__}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"expected decay in [0, 1], got {decay}")


def _spectral_norms(model):
    """``(prefix, module, name, index, parametrization)`` of every bsn_cuda SN/BSN in ``model``."""
    for prefix, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for index, p in enumerate(plist):
                if isinstance(p, _PARAMETRIZATIONS):
                    yield prefix, module, name, index, p


def _input_of(module, name, index):
    """The tensor the ``index``-th parametrization of ``module.<name>`` receives."""
    plist = module.parametrizations[name]
    weight = plist.original
    for p in list(plist)[:index]:
        weight = p(weight)
    return weight


def _vector_names(p):
    return [n for n in ("_u", "_v", "_u0", "_v0", "_u1", "_v1") if n in p._buffers]


@torch.no_grad()
def refresh_spectral_norm(model, n_power_iterations=None, *, tol=1e-4, max_iter=1000):
    """Make the power-iteration vectors of every bsn_cuda SN/BSN layer in ``model``
    unit vectors again, then iterate on the layer's current weight (in place).
    Returns ``model``. Also ``bsn_cuda.refresh_spectral_norm``.

    * ``n_power_iterations=None`` (default): converge: one iteration at a time
      until ``|sigma_k - sigma_{k-1}| <= tol * sigma_k`` or ``max_iter``
      iterations per layer (one host sync per iteration). For layers
      evaluated before any training (their stored sigma is a 15-iteration
      estimate) and before logging or exporting sigma.
    * ``n_power_iterations=n``: exactly ``n`` iterations (0 only renormalizes).

    For vectors edited by arithmetic (averaged, interpolated, loaded from an
    averaged checkpoint) too. Vectors that are zero or not finite are left alone.
    """
    check_module(model, "model")
    if n_power_iterations is not None:
        check_int("n_power_iterations", n_power_iterations, minimum=0)
    else:
        check_positive_float("tol", tol)
        check_int("max_iter", max_iter, minimum=1)
    for _, module, name, index, p in _spectral_norms(_unwrap(model)):
        for vec_name in _vector_names(p):
            vec = p._buffers[vec_name]
            acc = vec.to(torch.float64 if vec.dtype == torch.float64 else torch.float32)
            norm = torch.linalg.vector_norm(acc)
            ok = torch.isfinite(norm) & (norm > 0)
            vec.copy_(torch.where(ok, acc / torch.where(ok, norm, torch.ones_like(norm)), acc))
        if n_power_iterations is None:
            p.converge(_input_of(module, name, index), tol, max_iter)
        elif n_power_iterations > 0:
            p.power_iterate(_input_of(module, name, index), n_power_iterations)
    return model


@torch.no_grad()
def update_ema(ema_model, model, decay, *, n_power_iterations=1):
    """One EMA step: ``ema = decay * ema + (1 - decay) * model`` for the parameters.

    * Floating-point parameters are averaged (matched by name; integer ones copied).
    * The vectors of bsn_cuda SN/BSN layers are not averaged: they get
      ``n_power_iterations`` power iterations on the new EMA weight, starting
      from the EMA model's own vectors (``n_power_iterations=0``: copied from
      ``model`` instead). Either way they stay unit vectors.
    * All other buffers (BatchNorm statistics, torch SN vectors, ...) are copied.

    ``model`` may be wrapped in DistributedDataParallel/DataParallel or
    torch.compile. Returns ``ema_model``.
    """
    check_module(ema_model, "ema_model")
    check_module(model, "model")
    _check_decay(decay)
    check_int("n_power_iterations", n_power_iterations, minimum=0)
    ema_model, model = _unwrap(ema_model), _unwrap(model)

    ema_params = dict(ema_model.named_parameters())
    params = dict(model.named_parameters())
    ema_buffers = dict(ema_model.named_buffers())
    buffers = dict(model.named_buffers())
    if ema_params.keys() != params.keys() or ema_buffers.keys() != buffers.keys():
        missing = sorted((params.keys() | buffers.keys()) ^ (ema_params.keys() | ema_buffers.keys()))
        raise ValueError(f"ema_model and model have different parameters or buffers: {missing[:10]}")

    for key, ema_p in ema_params.items():
        p = params[key].detach()
        if ema_p.is_floating_point() or ema_p.is_complex():
            ema_p.lerp_(p.to(ema_p.dtype), 1.0 - decay)
        else:
            ema_p.copy_(p)

    iterated = set()
    if n_power_iterations > 0:
        for prefix, module, name, index, p in _spectral_norms(ema_model):
            base = f"{prefix}." if prefix else ""
            iterated.update(f"{base}parametrizations.{name}.{index}.{vec}" for vec in _vector_names(p))
            iterated.update(f"{base}parametrizations.{name}.{index}.{s}" for s in ("_sigma", "_sigmas"))
            p.power_iterate(_input_of(module, name, index), n_power_iterations)
    for key, ema_b in ema_buffers.items():
        if key not in iterated:
            ema_b.copy_(buffers[key])
    return ema_model


class EMA(nn.Module):
    """An EMA copy of ``model`` (kept in eval mode, no gradients).

    ``update(model)`` applies :func:`update_ema`; calling the EMA runs the
    averaged model. ``state_dict`` / ``load_state_dict`` hold the averaged
    model under ``module.``.
    """

    def __init__(self, model, decay=0.999, n_power_iterations=1):
        super().__init__()
        check_module(model, "model")
        _check_decay(decay)
        check_int("n_power_iterations", n_power_iterations, minimum=0)
        self.decay = float(decay)
        self.n_power_iterations = n_power_iterations
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    def update(self, model, decay=None):
        """One EMA step towards ``model`` (``decay`` overrides the default for this step)."""
        update_ema(
            self.module,
            model,
            self.decay if decay is None else decay,
            n_power_iterations=self.n_power_iterations,
        )

    def train(self, mode=True):
        super().train(mode)
        self.module.eval()  # the averaged model never iterates on its own
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def extra_repr(self):
        return f"decay={self.decay}, n_power_iterations={self.n_power_iterations}"
