"""The opt-in eval cache: :func:`cached`.

By default every forward recomputes the normalized weight. A cache keyed on
what torch can observe (tensor identity, version counters, data pointers)
cannot be right by default: writes through ``.data`` (``p.data.copy_(t)``,
WGAN clipping with ``p.data.clamp_``, EMA updates, ``vector_to_parameters``)
change a weight without bumping its version counter, and such a cache would
then return the weight normalized before the change.

Inside ``with bsn_cuda.cached():`` the user promises what
``torch.nn.utils.parametrize.cached()`` asks for: weights and vectors are not
written through ``.data`` while the context is open. Then an eval forward that
records no autograd graph and that nothing traces returns the normalized weight
of the layer's previous such forward in the same context. As a second line of
defence the entry is still checked against the identity, version counter and
data pointer of the weight, of each vector and of the returned tensor, so
in-place changes that torch counts, a new weight (``module.to()``,
``load_state_dict(assign=True)``, ``p.data = t``) or other vectors
(``functional_call``) recompute. Leaving the outermost context drops every
entry (and the tensors it held).

Owners (the parametrization modules and the legacy hooks) keep their entry in
their ``_cache`` attribute.
"""

import contextlib
import weakref

import torch

from .. import _context

__all__ = ["cached", "enabled", "applies", "lookup", "store"]

_depth = 0
_owners = weakref.WeakSet()  # objects holding an entry, emptied when the outermost context closes


@contextlib.contextmanager
def cached():
    """Context manager: eval forwards without a recorded graph reuse their last result.

    For sampling loops (``G.eval()``, ``torch.no_grad()``) where the weights do
    not change between calls. Do not write weights or the power-iteration
    vectors through ``.data`` inside it (as with
    ``torch.nn.utils.parametrize.cached()``); any other change is seen.
    Training forwards, forwards that record a graph and traced or transformed
    calls are never cached. Re-entrant; entries are dropped when the outermost
    context exits.
    """
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for owner in list(_owners):
                owner._cache = None
            _owners.clear()


def enabled():
    """True inside :func:`cached`."""
    return _depth > 0


def applies(weight):
    """Whether an eval forward of ``weight`` may use the cache (every owner asks here).

    Inside :func:`cached`, with no autograd graph recorded (no_grad, or a weight
    that does not require grad), not an inference tensor (its version counter
    is not tracked), and nothing tracing or transforming the call (compile,
    export, jit, torch.func). A training forward never may; its caller says so.
    """
    return (_depth > 0 and not (weight.requires_grad and torch.is_grad_enabled()) and not weight.is_inference()
            and _context.is_plain_eager())


def _key(weight, vectors, out):
    key = [id(weight), weight._version, weight.data_ptr(), id(out), out._version, out.data_ptr()]
    for t in vectors:
        key.append(id(t))
        key.append(t._version)
        key.append(t.data_ptr())
    return key


def lookup(cache, weight, vectors):
    """The cached output for ``weight`` and ``vectors``, or None (always None outside :func:`cached`)."""
    if cache is None or _depth == 0 or cache[1] is not weight:
        return None
    out = cache[2]
    return out if cache[0] == _key(weight, vectors, out) else None


def store(owner, compute, weight, vectors):
    """``compute()``'s output, kept as ``owner._cache`` until the outermost :func:`cached` exits.

    Under inference_mode the output is computed as a normal tensor, so that
    its version counter catches in-place changes to it.
    """
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            out = compute()
    else:
        out = compute()
    owner._cache = (_key(weight, vectors, out), weight, out, tuple(vectors))
    _owners.add(owner)
    return out
