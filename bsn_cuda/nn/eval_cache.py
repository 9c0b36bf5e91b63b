"""The eval cache: an eval forward that recomputes nothing when nothing changed.

Used by both flavours (parametrization and legacy hook). It may answer only
when no autograd graph is recorded and nothing traces the call (see
:func:`bsn_cuda._context.is_plain_eager`); the owner checks that. The key is
the identity and version counter of the weight, of each vector and of the
returned tensor itself, so an in-place change to any of them, a new weight
(``module.to()``, ``load_state_dict(assign=True)``) or other vectors
(``functional_call``) recomputes. The cache holds references to these
tensors, so their ids cannot be reused while it lives.
"""

import torch

__all__ = ["lookup", "store"]


def _key(weight, vectors, out):
    key = [id(weight), weight._version, id(out), out._version]
    for t in vectors:
        key.append(id(t))
        key.append(t._version)
    return key


def lookup(cache, weight, vectors):
    """The cached output for ``weight`` and ``vectors``, or None."""
    if cache is None or cache[1] is not weight:
        return None
    out = cache[2]
    return out if cache[0] == _key(weight, vectors, out) else None


def store(compute, weight, vectors):
    """``(out, cache)``: ``compute()``'s output and the cache entry for it.

    Under inference_mode the output is computed as a normal tensor, so that
    its version counter catches in-place changes to it.
    """
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            out = compute()
    else:
        out = compute()
    return out, (_key(weight, vectors, out), weight, out, tuple(vectors))
