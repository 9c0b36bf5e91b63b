"""Grouped spectral normalization and control over when u/v step (issue 22).

:func:`group_spectral_norm` makes every fused SN/BSN layer of a model (both
flavours, any mix of dims, dtypes, scales and iteration counts) get its
normalized weight from one ``bsn_cuda::group_forward`` call per forward of the
model: a forward pre-hook on the model computes all of them, each layer's
parametrization (or legacy hook) takes its tensor when its weight is the one
the group computed from (identity check), and a forward hook ends the hand-off.
Outside a forward of the model, and for any layer the group skips, a layer
runs exactly as it does ungrouped. Keys, checkpoints and Parameters are
untouched: the group is a pair of hooks plus an attribute on each layer.

Update modes (:func:`set_update_mode`, per layer; ``group_spectral_norm``'s
``update=`` sets it for the group), training forwards only:

* ``"forward"`` (default): torch's behaviour, one power-iteration update per
  training forward;
* ``"once"``: one update per training step. The first training forward after
  a step boundary updates u/v; later forwards of the step return the same
  ``W_sn`` tensor (the same autograd graph: one SN computation, one sigma)
  while it is valid. Step boundary (an update is due): the weight changed in
  a way torch counts (identity, version counter, data pointer) or an optimizer
  holding the weight stepped (torch's global optimizer step hook), since the
  layer's last update; for a weight no optimizer has been seen holding (FSDP2's
  gathered weights: the optimizer holds the shards), any optimizer step; or
  never updated. ``W_sn`` stays valid until: its
  backward ran (a hook on its autograd node), any optimizer step, any counted
  change of the weight or of a vector, a change of grad mode; and it is only
  kept when a graph is recorded. A forward after the backward of the same
  step recomputes ``W_sn`` from the current weight without a new update.
  What it cannot see: a write through ``.data`` (not counted by torch)
  between two forwards of one step with no backward and no optimizer step in
  between; call :func:`power_iteration_step` or
  :func:`invalidate_spectral_norm` after such a write.
* ``"never"``: no update in training forwards (sigma from the stored vectors,
  as in eval); :func:`power_iteration_step` runs one update explicitly.

See docs/design.md ("Grouped ops", "Update modes") and docs/guarantees.md.
"""

import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import _context, _onnx_export, _ops
from .._contract import KIND_BSN, KIND_SN, KIND_SN_TRANSPOSED
from .._checks import check_module
from . import eval_cache
from .legacy import _FUSED_COMPUTE_WEIGHT, FusedLegacySpectralNorm, legacy_forward
from .parametrizations import BidirectionalSpectralNorm, SpectralNorm

__all__ = [
    "UPDATE_MODES", "group_spectral_norm", "ungroup_spectral_norm", "set_update_mode", "power_iteration_step",
    "invalidate_spectral_norm", "SpectralNormGroup",
]

UPDATE_MODES = ("forward", "once", "never")
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_KIND_SN, _KIND_BSN, _KIND_T = KIND_SN, KIND_BSN, KIND_SN_TRANSPOSED
# The innermost saved-tensor hooks (torch >= 2.5; None before: the recomputation below is then not recognised,
# the layer takes its own path, and torch's checkpoint refuses the mismatch instead of computing wrongly).
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


# ---------------------------------------------------------------------------
# The layers of a model.


def _layers(model):
    """``[(owner, module, name)]``: every fused SN/BSN layer under ``model``, in module order.
    ``owner`` is the parametrization (``module`` its ParametrizationList) or the legacy hook."""
    found = []
    for module in model.modules():
        plists = module.__dict__["_modules"].get("parametrizations")
        if plists is not None:
            for plist in plists.values():
                for p in plist:
                    if isinstance(p, (SpectralNorm, BidirectionalSpectralNorm)):
                        found.append((p, plist, "original"))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, FusedLegacySpectralNorm):
                found.append((hook, module, hook.name + "_orig"))
    return found


_FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")  # public from 2.6; 2.4-2.5
_FSDP_TYPES = ()  # FSDP2's module class(es), once a model could have used them


def _fsdp_module_types():
    """FSDP2's module class as a tuple for isinstance, () while FSDP2 has not been imported.

    Looked up in ``sys.modules`` (importing torch's FSDP costs about a second): a model can only hold
    FSDP2 units once FSDP2 is imported, so until then no layer is under one."""
    global _FSDP_TYPES
    if not _FSDP_TYPES:
        found = []
        for name in _FSDP_MODULES:
            cls = getattr(sys.modules.get(name), "FSDPModule", None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
        _FSDP_TYPES = tuple(found)
    return _FSDP_TYPES


def _ancestry(model):
    """``{id(module): (model, ..., module)}`` for every module under ``model``."""
    chains = {}
    stack = [(model, (model,))]
    while stack:
        module, chain = stack.pop()
        chains.setdefault(id(module), chain)
        for child in module._modules.values():
            if child is not None:
                stack.append((child, chain + (child,)))
    return chains


def _flavour(owner):
    """``(kind, vector names)`` a layer's class fixes: the legacy hook (kind _KIND_T, its buffers named
    at the forward), SN (_KIND_SN) or BSN (_KIND_BSN; one matricization, per its ``single``, runs as SN)."""
    if isinstance(owner, FusedLegacySpectralNorm):
        return _KIND_T, ()
    if isinstance(owner, SpectralNorm):
        return _KIND_SN, ("_u", "_v")
    return _KIND_BSN, ("_u0", "_v0", "_u1", "_v1")


def _groupable(owner, module):
    """Whether a layer can take its weight from the group (the static part; the rest is checked per forward)."""
    if isinstance(owner, FusedLegacySpectralNorm):
        return type(owner).compute_weight is _FUSED_COMPUTE_WEIGHT
    return len(module) == 1 and not getattr(owner, "_complex", False)


# ---------------------------------------------------------------------------
# update="once": the per-layer record.

_OPT_STEPS = [0]  # optimizer steps so far (any optimizer): ends every shared W_sn
_PARAM_STEPS = {}  # id(weight) -> steps of optimizers holding it, for weights of "once" layers


def _on_optimizer_step(optimizer, args, kwargs):
    _OPT_STEPS[0] += 1
    if _PARAM_STEPS:
        for group in optimizer.param_groups:
            for p in group["params"]:
                key = id(p)
                if key in _PARAM_STEPS:
                    _PARAM_STEPS[key] += 1


register_optimizer_step_post_hook(_on_optimizer_step)


class _Once:
    """State of one layer in update="once": when it last updated, and the W_sn its step shares."""

    __slots__ = ("updated", "out", "weight", "key", "valid")

    def __init__(self):
        # At the last update: (weight, version, data_ptr, steps of optimizers holding it, all optimizer steps).
        self.updated = None
        self.out = None
        self.weight = None  # the weight object `out` was computed from (compared by identity)
        self.key = None
        self.valid = False

    def __getstate__(self):  # copies start a new step: no shared tensor, an update due
        return True

    def __setstate__(self, state):
        self.__init__()

    def invalidate(self, *_):
        self.valid = False
        self.out = self.weight = None

    def due(self, weight):
        """Whether an update is due (a step boundary since the last one)."""
        u = self.updated
        if u is None or u[0] is not weight or u[1] != weight._version or u[2] != weight.data_ptr():
            return True
        steps = _PARAM_STEPS.get(id(weight), 0)
        if steps:  # an optimizer holds the weight: its steps are the boundaries
            return u[3] != steps
        # No optimizer seen holding it (FSDP2's gathered weight: the optimizer holds the shards, and the
        # all-gather rewrites the weight without a version bump): any optimizer step is a boundary.
        return u[4] != _OPT_STEPS[0]

    def mark_updated(self, weight):
        _PARAM_STEPS.setdefault(id(weight), 0)
        self.updated = (weight, weight._version, weight.data_ptr(), _PARAM_STEPS[id(weight)], _OPT_STEPS[0])

    def lookup(self, weight, vectors):
        if self.valid and self.weight is weight and self.key == _key(weight, vectors):
            return self.out
        return None

    def keep(self, out, weight, vectors):
        """Share ``out`` with the step's later forwards (only when it carries a graph)."""
        node = out.grad_fn
        if node is None:
            self.invalidate()
            return None
        self.out, self.weight, self.key, self.valid = out, weight, _key(weight, vectors), True
        return node


def _key(weight, vectors):
    """What a write torch counts changes: versions and data pointers (the weight's identity is compared
    apart: ``==`` on tensors would compare their values)."""
    key = [weight._version, weight.data_ptr(), _OPT_STEPS[0]]
    for v in vectors:
        key += (v._version, v.data_ptr())
    return key


def _once(owner):
    rec = owner.__dict__.get("_bsn_once")
    if rec is None:
        rec = owner.__dict__["_bsn_once"] = _Once()
    return rec


def _eager_only(mode):
    if not _context.is_plain_eager():
        raise RuntimeError(
            f"bsn_cuda: expected update='{mode}' in plain eager execution, got a call under torch.compile, "
            "jit tracing or torch.func (its shared W_sn is eager state); use update='never' with "
            "bsn_cuda.power_iteration_step(model) once per step, or update='forward'")


# ---------------------------------------------------------------------------
# One layer's tensors and its per-layer computation.


def _tensors(owner, module):
    """``(weight, vectors in torch's naming order)`` of a layer."""
    if isinstance(owner, FusedLegacySpectralNorm):
        name = owner.name
        b = module._buffers
        return module._parameters.get(name + "_orig"), (b.get(name + "_u"), b.get(name + "_v"))
    b = owner._buffers
    return module._parameters.get("original"), tuple(b.get(n) for n in owner._vector_names)


def _per_layer(owner, module, weight, update):
    """The layer's own (ungrouped) computation of its training forward with ``update``."""
    if isinstance(owner, FusedLegacySpectralNorm):
        u, v = module._buffers[owner.name + "_u"], module._buffers[owner.name + "_v"]
        return legacy_forward(weight, u, v, owner.dim, owner.n_power_iterations, owner.eps, update,
                              coeff=owner.coeff)[0]
    return owner._run(weight, owner.n_power_iterations, update, owner._buffers[owner._LOG])[0]


def _layer_training(owner, module):
    return (module if isinstance(owner, FusedLegacySpectralNorm) else owner).training


def _intercept(owner, module, weight):
    """The forward of a layer with a group or an update mode; None: the layer's usual path."""
    group = owner.__dict__.get("_bsn_group")
    if group is not None:
        grp, i = group
        outs = grp._outs
        if outs is not None:
            if grp._weights[i] is weight and outs[i] is not None:
                return outs[i]
        elif (_context.in_backward_pass() and _saved_tensor_hooks is not None
              and _saved_tensor_hooks(False) is not None):
            # Non-reentrant activation checkpointing recomputes a part of the model: that part's
            # original forward took the group's tensor and saved nothing for SN; so does this.
            last = grp._last
            if last is not None and last[0][i] is weight and last[1][i] is not None:
                return last[1][i]
    mode = owner.__dict__.get("_bsn_update", "forward")
    if mode == "forward" or not _layer_training(owner, module) or _onnx_export.is_exporting():
        return None
    if _context.in_backward_pass():  # a checkpoint recomputation: the usual path (no update)
        return None
    if mode == "never":
        return _per_layer(owner, module, weight, False)
    _eager_only(mode)
    weight_, vectors = _tensors(owner, module)
    if weight_ is not weight or weight.dtype.is_complex:
        return None
    rec = _once(owner)
    out = rec.lookup(weight, vectors)
    if out is not None:
        return out
    update = rec.due(weight)
    out = _per_layer(owner, module, weight, update)
    if update:
        rec.mark_updated(weight)
    node = rec.keep(out, weight, vectors) if torch.is_grad_enabled() else rec.invalidate()
    if node is not None:
        node.register_hook(rec.invalidate)
    return out


def _param_intercept(owner, weight):
    return _intercept(owner, owner.__dict__["_bsn_plist"], weight)


def _legacy_intercept(owner, module):
    return _intercept(owner, module, module._parameters.get(owner.name + "_orig"))


def _install(owner, module):
    """Route the layer's forward through :func:`_intercept` (while it has a group or a mode)."""
    if isinstance(owner, FusedLegacySpectralNorm):
        owner.__dict__["_intercept"] = _legacy_intercept
    else:
        owner.__dict__["_bsn_plist"] = module
        owner.__dict__["_intercept"] = _param_intercept


def _uninstall_if_plain(owner):
    d = owner.__dict__
    if d.get("_bsn_group") is None and d.get("_bsn_update", "forward") == "forward":
        for key in ("_intercept", "_bsn_plist", "_bsn_once"):
            d.pop(key, None)


# ---------------------------------------------------------------------------
# The group.


class SpectralNormGroup:
    """The hooks :func:`group_spectral_norm` puts on a model (see the module docstring)."""

    def __init__(self, model, layers):
        self.layers = layers  # [(owner, module, weight key)]
        self._static = [_flavour(owner) for owner, _, _ in layers]
        # FSDP2 units at or below the model, found at each forward (fully_shard may come after grouping):
        # a unit reshards its weights and reduces their gradients when its own backward is done, before
        # the group's node (created earlier, so run later) has computed them; its layers run per layer.
        chains = _ancestry(model)
        self._chains = [chains[id(module)] for _, module, _ in layers]
        self._ancestors = list({id(m): m for chain in self._chains for m in chain}.values())
        self._outs = None  # during a forward of the model: each layer's tensor (None: per layer)
        self._weights = None  # the weights those were computed from
        self._last = None  # (weights, outs) of the last forward, for checkpoint recomputation
        self._handles = (model.register_forward_pre_hook(self._pre_hook),
                         model.register_forward_hook(self._post_hook, always_call=True))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_outs"] = state["_weights"] = state["_last"] = None
        return state

    def remove(self):
        for h in self._handles:
            h.remove()
        for owner, module, _ in self.layers:
            owner.__dict__.pop("_bsn_group", None)
            _uninstall_if_plain(owner)
        self._outs = self._weights = self._last = None

    def _post_hook(self, model, args, output):
        if self._outs is not None:
            self._last = (self._weights, self._outs)
        self._outs = self._weights = None

    def _pre_hook(self, model, args):
        self._outs = self._weights = None
        if not _context.is_plain_eager() or _onnx_export.is_exporting():
            return  # the layers run per layer (what those tracers and transforms support)
        self._outs, self._weights = self.compute(recompute=_context.in_backward_pass())

    def compute(self, recompute=False, force_update=None):
        """One group_forward call for every layer that can take part; ``(outs, weights)`` per layer.

        ``force_update``: True (power_iteration_step) or None (each layer's mode decides). Every
        setting is read from the layer at each call (a user may change any of them between forwards);
        only what a layer's class fixes (its flavour, its vectors' names) is looked up once."""
        n = len(self.layers)
        outs, weights = [None] * n, [None] * n
        ws, vecs, kinds, dims, iters, eps, scales, update, logs, index, once = ([] for _ in range(11))
        grad = torch.is_grad_enabled()
        cache = eval_cache.enabled()
        writable = not recompute and _ops.log_writable()
        sharded = self._fsdp_layers()
        on_cpu, on_cuda = "cpu" in _ops.GROUP_DEVICES, "cuda" in _ops.GROUP_DEVICES
        for i, (owner, module, key) in enumerate(self.layers):
            w = module._parameters.get(key)
            if (w is None or type(w) not in _PLAIN or not ((on_cpu and w.is_cpu) or (on_cuda and w.is_cuda))
                    or (sharded and i in sharded)):
                continue
            weights[i] = w
            flavour, names = self._static[i]
            legacy = flavour == _KIND_T
            training = module.training if legacy else owner.training
            if not training and cache and not (grad and w.requires_grad):
                continue  # the eval cache answers per layer
            if force_update is not None:
                upd = force_update
            else:
                mode = owner.__dict__.get("_bsn_update", "forward")
                if not training or recompute or mode == "never":
                    upd = False
                elif mode == "forward":
                    upd = True
                else:  # once
                    _, v = _tensors(owner, module)
                    rec = _once(owner)
                    out = rec.lookup(w, v)
                    if out is not None:
                        outs[i] = out
                        continue
                    upd = rec.due(w)
                    once.append(i)
            if w.ndim < 2:
                continue
            b = module._buffers if legacy else owner._buffers
            if legacy:
                if w.dtype.is_complex or (upd and owner.dim != 0) or owner.coeff is not None:
                    continue
                name = owner.name
                u, v = b[name + "_u"], b[name + "_v"]
                if upd:  # torch's order: the op on W_mat^T, vectors swapped
                    kinds.append(_KIND_T), dims.append(1), vecs.extend((v, u))
                else:  # no iteration: sigma along dim, as the layer's eval path
                    kinds.append(_KIND_SN), dims.append(owner.dim), vecs.extend((u, v))
                scales.append(1.0)
                logs.append(None)
            else:
                if owner._variant:  # variants (coeff, gamma, track-only): per layer
                    continue
                if flavour == _KIND_BSN and owner.single:
                    kinds.append(_KIND_SN), dims.append(0), vecs.extend((b["_u0"], b["_v0"]))
                else:
                    kinds.append(flavour), dims.append(owner.dim if flavour == _KIND_SN else 0)
                    vecs.extend(map(b.__getitem__, names))
                scales.append(owner.scale)
                # Not in a checkpoint recomputation (the per-layer path logs nothing there either).
                logs.append(b[owner._LOG] if writable else None)
            ws.append(w)
            iters.append(owner.n_power_iterations)
            eps.append(float(owner.eps))
            update.append(bool(upd))
            index.append(i)
        if once:
            taken = set(index)
            once = [i for i in once if i in taken]
        if ws:
            new_outs, _ = _ops.group_forward(ws, vecs, kinds, dims, iters, eps, scales, update, logs)
            for i, out in zip(index, new_outs):
                outs[i] = out
            if once:
                self._keep_once(once, index, update, weights, outs)
        return outs, weights

    def _fsdp_layers(self):
        """Indices of the layers under an FSDP2 unit (empty, the usual case, without one)."""
        types = _fsdp_module_types()
        if not types:
            return ()
        units = [m for m in self._ancestors if isinstance(m, types)]
        if not units:
            return ()
        ids = {id(m) for m in units}
        return {i for i, chain in enumerate(self._chains) if any(id(m) in ids for m in chain)}

    def _keep_once(self, once, index, update, weights, outs):
        pos = {i: k for k, i in enumerate(index)}
        recs, kept = [], []
        for i in once:
            owner, module, _ = self.layers[i]
            rec = _once(owner)
            w = weights[i]
            if update[pos[i]]:
                rec.mark_updated(w)
            if torch.is_grad_enabled() and outs[i].grad_fn is not None:
                rec.keep(outs[i], w, _tensors(owner, module)[1])
                recs.append(rec)
                kept.append(pos[i])
            else:
                rec.invalidate()
        if recs:
            node = outs[once[0]].grad_fn  # the group's node: one for every output of the call
            slots = dict(zip(kept, recs))

            def ran(grad_inputs, grad_outputs):
                # Layers whose output received a gradient: their shared W_sn is spent.
                for k, rec in slots.items():
                    if k < len(grad_outputs) and grad_outputs[k] is not None:
                        rec.invalidate()

            node.register_hook(ran)


def _group_of(owner):
    g = owner.__dict__.get("_bsn_group")
    return g[0] if g is not None else None


def group_spectral_norm(model, update="forward"):
    """Compute every fused SN/BSN layer of ``model`` in one op call per forward of ``model``; returns ``model``.

    Both flavours (``bsn_cuda.spectral_norm``, ``bidirectional_spectral_norm``,
    ``bsn_cuda.nn.utils.spectral_norm``), any mix of shapes, dims, dtypes,
    scales and iteration counts; results are bitwise those of the per-layer
    path. ``update``: ``"forward"``, ``"once"`` or ``"never"`` (see
    :func:`set_update_mode`), set on every layer of the group. Layers that
    cannot take part (complex or 1-D weights, a stacked parametrization, a
    hook subclass with its own ``compute_weight``, a weight that is not a plain
    tensor at the forward, a layer under an FSDP2 unit (``fully_shard``, before
    or after grouping), a device without a grouped kernel) run per layer. Under torch.compile, jit tracing, torch.func and
    ONNX export every layer runs per layer. Undo with :func:`ungroup_spectral_norm`.
    """
    check_module(model, "model")
    _check_mode(update)
    if _model_group(model) is not None:
        raise ValueError("group_spectral_norm: expected a model without a group, got one that has one "
                         "(bsn_cuda.ungroup_spectral_norm(model) first)")
    found = _layers(model)
    counts = {}
    for owner, _, _ in found:
        counts[id(owner)] = counts.get(id(owner), 0) + 1
    layers = []
    for owner, module, key in found:
        if counts[id(owner)] > 1:
            continue  # one parametrization or hook object used twice: per layer, in call order
        if _group_of(owner) is not None:
            raise ValueError(f"group_spectral_norm: expected layers without a group, got {type(owner).__name__} "
                             "already grouped by another model (ungroup it first)")
        if _groupable(owner, module):
            layers.append((owner, module, key))
    group = SpectralNormGroup(model, layers)
    model.__dict__["_bsn_spectral_norm_group"] = group
    for i, (owner, module, _) in enumerate(layers):
        owner.__dict__["_bsn_group"] = (group, i)
        _install(owner, module)
    set_update_mode(model, update)
    return model


def _model_group(model):
    return model.__dict__.get("_bsn_spectral_norm_group")


def ungroup_spectral_norm(model):
    """Undo :func:`group_spectral_norm`: every layer runs per layer again (update modes stay). Returns ``model``."""
    check_module(model, "model")
    group = model.__dict__.pop("_bsn_spectral_norm_group", None)
    if group is None:
        raise ValueError("ungroup_spectral_norm: expected a model grouped by bsn_cuda.group_spectral_norm, "
                         "got one without a group")
    group.remove()
    return model


def _check_mode(mode):
    if mode not in UPDATE_MODES:
        raise ValueError(f"expected update to be one of {', '.join(map(repr, UPDATE_MODES))}, got {mode!r}")


def set_update_mode(module, mode):
    """When the power iteration of every fused SN/BSN layer under ``module`` (itself included) steps:
    ``"forward"`` (every training forward, torch's), ``"once"`` (once per training step, the step's
    forwards share one W_sn) or ``"never"`` (only :func:`power_iteration_step`). Returns ``module``."""
    check_module(module)
    _check_mode(mode)
    for owner, mod, _ in _layers(module):
        d = owner.__dict__
        if mode == "forward":
            d.pop("_bsn_update", None)
            d.pop("_bsn_once", None)
            if d.get("_bsn_group") is None:
                _uninstall_if_plain(owner)
        else:
            d["_bsn_update"] = mode
            d.pop("_bsn_once", None)
            _install(owner, mod)
    return module


def invalidate_spectral_norm(module):
    """Drop the W_sn that update="once" layers under ``module`` share within a step (after a write
    torch does not count, e.g. through ``.data``). The next forward recomputes it; no update."""
    check_module(module)
    for owner, _, _ in _layers(module):
        rec = owner.__dict__.get("_bsn_once")
        if rec is not None:
            rec.invalidate()
    return module


@torch.no_grad()
def power_iteration_step(module):
    """One power-iteration update (``n_power_iterations`` iterations) of every fused SN/BSN layer under
    ``module``, now, whatever its mode; the same arithmetic as a training forward's update. Layers in
    update="once" count it as their update of the current step. Returns ``module``."""
    check_module(module)
    group = _model_group(module)
    done = set()
    if group is not None:
        outs, weights = group.compute(force_update=True)
        for (owner, mod, _), out, w in zip(group.layers, outs, weights):
            if out is not None:
                done.add(id(owner))
                _after_explicit_step(owner, w)
    for owner, mod, _ in _layers(module):
        if id(owner) in done:
            continue
        done.add(id(owner))
        weight, _ = _tensors(owner, mod)
        if weight is None:
            continue
        if isinstance(owner, FusedLegacySpectralNorm):
            u, v = mod._buffers[owner.name + "_u"], mod._buffers[owner.name + "_v"]
            legacy_forward(weight.detach(), u, v, owner.dim, owner.n_power_iterations, owner.eps, True,
                           coeff=owner.coeff)
        else:
            owner._cache = None
            owner._run(weight.detach(), owner.n_power_iterations, True, owner._buffers[owner._LOG])
        _after_explicit_step(owner, weight)
    return module


def _after_explicit_step(owner, weight):
    if owner.__dict__.get("_bsn_update") == "once":
        rec = _once(owner)
        rec.invalidate()
        rec.mark_updated(weight)
