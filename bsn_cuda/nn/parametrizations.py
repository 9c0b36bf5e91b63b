"""The SN and BSN parametrizations (for ``torch.nn.utils.parametrize``).

Both share :class:`_NormParametrization`, which owns what is not about the
math: the training/eval forward, the sigma log for :func:`get_sigma`, the eval
cache, activation-checkpoint recomputation, and dtype moves. Subclasses say
how to run the op (``_run``) and how many sigmas they log.

The forward runs on every read of ``module.weight``, so it is kept short:
buffers are read from ``_buffers`` directly, the op is called once, and the
sigma log is written by the op's fast entry point (``bsn_cuda._ops``).
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import _complex, _context, _onnx_export, _ops, reference
from . import eval_cache
from .._checks import (check_dim, check_hyperparameters, check_module, check_n_power_iterations, check_name,
                       check_variant_kwargs, check_weight)
from ..functional import WARM_UP_ITERATIONS, draw_unit_vectors, uses_single_matricization

__all__ = ["SpectralNorm", "BidirectionalSpectralNorm", "PARAMETRIZATIONS", "find_parametrization",
           "uses_single_matricization"]

# Learnable scale: gamma starts at sigma from a power iteration run to this relative change.
GAMMA_INIT_TOL = 1e-6
GAMMA_INIT_MAX_ITER = 1000


class _NormParametrization(nn.Module):
    """Base of :class:`SpectralNorm` and :class:`BidirectionalSpectralNorm`.

    Subclasses define ``_run(weight, n_power_iterations, update, log) -> (out, state)``
    (``log``: the sigma log buffer to write, or None) and ``_LOG`` (that
    buffer's name), and ``_vector_names`` (their power-iteration buffers).

    **Eval cache** (opt-in, inside ``bsn_cuda.cached()``; see
    :mod:`bsn_cuda.nn.eval_cache`). In eval mode, when no autograd graph is
    recorded (no_grad, inference_mode, or a weight that does not require grad)
    and nothing traces the call (compile, export, jit, torch.func), the output
    of the last eval forward in the context is returned again if the weight
    (same tensor), the vectors and the returned tensor itself are unchanged.
    Any training forward, power iteration or mode switch drops it.
    """

    _LOG = "_sigma"
    # Set per instance by bsn_cuda.nn.grouping (a group's hand-off, update modes): returns the
    # forward's result, or None for the path below.
    _intercept = None

    def _init_common(self, weight, n_power_iterations, eps, scale, log_len, variant=None):
        self.eps = eps
        self.scale = float(scale)
        self.n_power_iterations = n_power_iterations
        self._cache = None
        # Variants (docs/design.md): soft bound, learnable scale, track-only, eval iterations.
        v = variant or {}
        self.coeff = v.get("coeff")
        self.learnable_scale = v.get("learnable_scale", False)
        self.track_only = v.get("track_only", False)
        self.n_power_iterations_eval = v.get("n_power_iterations_eval", 0)
        self._variant = ()  # the ops' (coeff, gamma, track_only), set by _finish_variant
        acc = torch.float64 if weight.dtype in (torch.float64, torch.complex128) else torch.float32
        # The sigmas of the last forward (get_sigma); not in the state_dict.
        self.register_buffer(self._LOG, torch.full((log_len,), math.nan, dtype=acc, device=weight.device),
                             persistent=False)

    # -- forward -----------------------------------------------------------

    def forward(self, weight):
        if self._intercept is not None:
            out = self._intercept(self, weight)
            if out is not None:
                return out
        if _onnx_export.is_exporting():  # ONNX: the eval formula in plain ops (no fused op, no u/v update)
            _onnx_export.check_eval(self.training, type(self).__name__)
            return _onnx_export.eval_graph(self, weight)
        if self.training:
            if self._cache is not None:  # (a plain assignment costs a Module.__setattr__ per call)
                self._cache = None
            if _context.in_backward_pass():  # a checkpoint recomputation: no second update
                return self._run(weight, self.n_power_iterations, False, None)[0]
            return self._run(weight, self.n_power_iterations, True, self._buffers[self._LOG])[0]
        log = self._buffers[self._LOG]
        if not eval_cache.applies(weight):
            if self._cache is not None:
                self._cache = None
            return self._run(weight, self.n_power_iterations, False, log)[0]
        vectors = [self._buffers[name] for name in self._vector_names]
        out = eval_cache.lookup(self._cache, weight, vectors)
        if out is None:
            out = eval_cache.store(self, lambda: self._run(weight, self.n_power_iterations, False, log)[0], weight,
                                   vectors)
        return out

    def train(self, mode=True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # The sigma log (and gamma) stay in the accumulation dtype across module.to(dtype)/.half().
        self._cache = None
        result = super()._apply(fn, *args, **kwargs)
        buf = self._buffers.get(self._LOG)
        if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
            self._buffers[self._LOG] = buf.float()
        gamma = self._parameters.get("gamma")
        if gamma is not None and gamma.dtype in (torch.float16, torch.bfloat16):
            gamma.data = gamma.data.float()
        return result

    # -- variants -------------------------------------------------------------

    def _finish_variant(self, weight):
        """After the vectors exist: gamma (learnable scale) = sigma of a converged
        power iteration, so that the layer starts as the identity."""
        if self.learnable_scale:
            sigma = self.converge(weight.detach(), GAMMA_INIT_TOL, GAMMA_INIT_MAX_ITER)
            self.gamma = nn.Parameter(sigma.reshape(()).clone())
        self._refresh_variant()

    def _refresh_variant(self):
        if self.coeff is None and not self.learnable_scale and not self.track_only and not self.n_power_iterations_eval:
            self._variant = ()
        else:
            self._variant = (float(self.coeff or 0.0), None, bool(self.track_only))

    def _variant_args(self):
        # gamma is read at each call: the Parameter object may be replaced (load_state_dict(assign=True), .to()).
        if self.learnable_scale:
            return (self._variant[0], self._parameters["gamma"], False)
        return self._variant

    def _eval_iterations(self, update):
        """``(n, update, vectors_are_copies)`` of a call: an eval forward with
        ``n_power_iterations_eval > 0`` iterates on copies of the vectors."""
        if not update and self.n_power_iterations_eval > 0 and not self.training:
            return self.n_power_iterations_eval, True, True
        return None, update, False

    def _output(self, weight, out):
        # Track-only: the weight itself passes through (values and gradient).
        return weight if self.track_only else out

    @torch.no_grad()
    def converge(self, weight, tol=1e-4, max_iter=1000):
        """Power-iterate (in place, one iteration at a time) until
        ``|sigma_k - sigma_{k-1}| <= tol * sigma_k`` or ``max_iter`` iterations;
        returns sigma (0-dim tensor, acc dtype). One host sync per iteration."""
        self._cache = None
        weight = weight.detach()
        prev = None
        sigma = None
        for _ in range(max_iter):
            _, state = self._run(weight, 1, True, self._buffers[self._LOG], plain=True)
            if state is None:  # 1-D weight: sigma is exact
                return self._buffers[self._LOG][0].clone()
            sigma = state[0].clone()
            value = float(sigma)
            if prev is not None and abs(value - prev) <= tol * abs(value):
                break
            if not math.isfinite(value):
                break
            prev = value
        return sigma

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None  # never pickle or deep-copy the cached output
        return state

    def __setstate__(self, state):
        state.setdefault("_cache", None)
        super().__setstate__(state)

    # -- helpers used by the public API and bsn_cuda.ema ---------------------

    def normalize(self, weight, update):
        """``(W_normalized, state)``; ``update`` runs the power iteration (training).
        ``state[0]`` is sigma (see docs/design.md for the rest). Does not log."""
        return self._run(weight, self.n_power_iterations, update, None)

    @torch.no_grad()
    def power_iterate(self, weight, n_power_iterations):
        """Run ``n_power_iterations`` power iterations on the vectors for ``weight``
        (in place, no gradient) and log the resulting sigma (see :mod:`bsn_cuda.ema`)."""
        self._cache = None
        self._run(weight.detach(), n_power_iterations, True, self._buffers[self._LOG])

    def right_inverse(self, value):
        return value

    def _log_vector_norm(self, weight, log):
        # 1-D weights: sigma is ||W||.
        if log is not None and _ops.log_writable():
            with torch.no_grad():
                log.fill_(torch.linalg.vector_norm(weight.detach().to(log.dtype)))


class SpectralNorm(_NormParametrization):
    """The SN parametrization: ``scale * W / sigma(W_mat(dim))``.

    Mirrors ``torch.nn.utils.parametrizations._SpectralNorm``: buffers ``_u``,
    ``_v`` (drawn with the same RNG calls, then 15 power iterations), one
    update of ``n_power_iterations`` per forward in training mode, none in
    eval. ``_sigma`` (not saved in the ``state_dict``) holds the last sigma.
    A weight with sigma 0 gives ``scale * W`` (torch: NaN). 1-D weights:
    ``W / max(||W||, eps) * scale``, no buffers. Complex weights run the same
    math in plain torch ops (not fused).

    ``vectors=(u, v)`` starts from copies of given vectors instead (no RNG
    use, no warm-up); :func:`convert_spectral_norm` uses it.

    A forward run inside a backward pass (the recomputation of activation
    checkpointing) does not iterate: it evaluates sigma from the stored
    vectors, so they are updated once per real forward.
    """

    _LOG = "_sigma"

    def __init__(self, weight, n_power_iterations=1, dim=0, eps=1e-12, scale=1.0, *, vectors=None, **variant):
        super().__init__()
        check_weight(weight, allow_complex=True)
        self.dim = check_dim(dim, weight.ndim)
        check_n_power_iterations(n_power_iterations)
        check_hyperparameters(n_power_iterations, eps, scale)
        variant = check_variant_kwargs(weight, **variant)
        self._init_common(weight, n_power_iterations, eps, scale, 1, variant)
        self._complex = weight.is_complex()
        self._vector_names = ("_u", "_v") if weight.ndim > 1 else ()
        if weight.ndim == 1:
            return
        with torch.no_grad():
            if vectors is None:
                u, v = draw_unit_vectors(weight, self.dim, eps)
                self.register_buffer("_u", u)
                self.register_buffer("_v", v)
                self._run(weight.detach(), WARM_UP_ITERATIONS, True, None)
            else:
                u, v = vectors
                self.register_buffer("_u", u.detach().clone(memory_format=torch.contiguous_format))
                self.register_buffer("_v", v.detach().clone(memory_format=torch.contiguous_format))
        self._finish_variant(weight)

    def _run(self, weight, n_power_iterations, update, log, plain=False):
        if weight.ndim == 1:
            self._log_vector_norm(weight, log)
            return reference.normalize_vector(weight, self.eps, self.scale), None
        b = self._buffers
        if self._complex:
            out, state = _complex.sn_forward(weight, b["_u"], b["_v"], self.dim, n_power_iterations, self.eps,
                                             self.scale, update)
            if log is not None and _ops.log_writable():
                log.copy_(state)
            return out, state
        if not self._variant or plain:
            return _ops.sn_forward(weight, b["_u"], b["_v"], self.dim, n_power_iterations, self.eps, self.scale,
                                   update, log)
        n_eval, update, copies = self._eval_iterations(update)
        u, v = (b["_u"].clone(), b["_v"].clone()) if copies else (b["_u"], b["_v"])
        out, state = _ops.sn_forward(weight, u, v, self.dim, n_eval or n_power_iterations, self.eps, self.scale,
                                     update, log, *self._variant_args())
        return self._output(weight, out), state

    def extra_repr(self):
        return (f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, scale={self.scale}"
                + _variant_repr(self))


class BidirectionalSpectralNorm(_NormParametrization):
    """The BSN/BSSN parametrization: ``scale * W / ((sigma_0 + sigma_1) / 2)``.

    ``sigma_0`` is estimated on ``W_mat(0)`` (``[c_out, c_in * k]``, buffers
    ``_u0``, ``_v0``), ``sigma_1`` on ``W_mat(1)`` (``[c_in, c_out * k]``,
    buffers ``_u1``, ``_v1``). Weights whose two matricizations are transposes
    of each other (2-D, 1x1 kernels) use SN along dim 0 with ``_u0``/``_v0``
    only. Buffers are drawn (pair 0, then pair 1, ``u`` before ``v``) and
    warmed up (15 iterations) like torch's SN. ``_sigmas`` holds
    ``[sigma, sigma_0, sigma_1]`` of the last forward (not in the ``state_dict``).
    A weight with sigma 0 gives ``scale * W``; 1-D weights:
    ``W / max(||W||, eps) * scale``. Real weights only.
    """

    _LOG = "_sigmas"

    def __init__(self, weight, n_power_iterations=1, eps=1e-12, scale=1.0, **variant):
        super().__init__()
        check_weight(weight, what="a weight for bidirectional_spectral_norm")
        check_n_power_iterations(n_power_iterations)
        check_hyperparameters(n_power_iterations, eps, scale)
        variant = check_variant_kwargs(weight, **variant)
        self._init_common(weight, n_power_iterations, eps, scale, 3, variant)
        self.single = weight.ndim >= 2 and uses_single_matricization(weight.shape)
        if weight.ndim < 2:
            self._vector_names = ()
            return
        dims = (0,) if self.single else (0, 1)
        self._vector_names = tuple(f"_{x}{k}" for k in dims for x in "uv")
        with torch.no_grad():
            for k in dims:
                u, v = draw_unit_vectors(weight, k, eps)
                self.register_buffer(f"_u{k}", u)
                self.register_buffer(f"_v{k}", v)
            self._run(weight.detach(), WARM_UP_ITERATIONS, True, None, plain=True)
        self._finish_variant(weight)

    def _run(self, weight, n_power_iterations, update, log, plain=False):
        if weight.ndim == 1:
            self._log_vector_norm(weight, log)
            return reference.normalize_vector(weight, self.eps, self.scale), None
        b = self._buffers
        variant = () if plain else self._variant
        copies = False
        if variant:
            n_eval, update, copies = self._eval_iterations(update)
            n_power_iterations = n_eval or n_power_iterations
            variant = self._variant_args()
        names = self._vector_names
        vecs = [b[n].clone() for n in names] if copies else [b[n] for n in names]
        if self.single:  # the log then holds [sigma, sigma, sigma]
            out, state = _ops.sn_forward(weight, vecs[0], vecs[1], 0, n_power_iterations, self.eps, self.scale,
                                         update, log, *variant)
        else:
            out, state = _ops.bsn_forward(weight, *vecs, n_power_iterations, self.eps, self.scale, update, log,
                                          *variant)
        return (self._output(weight, out) if variant else out), state

    def extra_repr(self):
        mode = "single matricization (SN, dim 0)" if self.single else "two matricizations"
        return (f"{mode}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, scale={self.scale}"
                + _variant_repr(self))


def _variant_repr(p):
    parts = []
    if p.coeff is not None:
        parts.append(f"coeff={p.coeff}")
    if p.learnable_scale:
        parts.append("learnable_scale=True")
    if p.track_only:
        parts.append("track_only=True")
    if p.n_power_iterations_eval:
        parts.append(f"n_power_iterations_eval={p.n_power_iterations_eval}")
    return "".join(", " + x for x in parts)


PARAMETRIZATIONS = (SpectralNorm, BidirectionalSpectralNorm)


def find_parametrization(module, name):
    """Our SN or BSN parametrization of ``module.<name>`` (the first one), or ValueError."""
    check_module(module)
    check_name(name)
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, PARAMETRIZATIONS):
                return p
    raise ValueError(f"spectral_norm of '{name}' not found in {module}")
