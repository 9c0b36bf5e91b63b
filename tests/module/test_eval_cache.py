"""The eval cache (bsn_cuda/nn/eval_cache.py): eval forwards without a recorded
graph reuse the last output while nothing it depends on changed, and never
return a stale one."""

import pytest
import torch
from torch import nn

import bsn_cuda
from bsn_cuda import reference


def _layers():
    torch.manual_seed(0)
    return {
        "sn": bsn_cuda.spectral_norm(nn.Conv2d(3, 4, 3)),
        "bsn": bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(3, 4, 3)),
        "legacy": bsn_cuda.nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)),
    }


def _weight(layer):
    legacy = not hasattr(layer, "parametrizations")
    if legacy:  # what a forward does: the pre-hook recomputes .weight
        for hook in layer._forward_pre_hooks.values():
            hook(layer, None)
    return layer.weight


def _original(layer):
    return layer.weight_orig if hasattr(layer, "weight_orig") else layer.parametrizations.weight.original


def _vectors(layer):
    if hasattr(layer, "weight_u"):
        return [layer.weight_u, layer.weight_v]
    norm = layer.parametrizations.weight[0]
    return [b for n, b in norm.named_buffers() if n.startswith(("_u", "_v"))]


def _fresh(layer):
    """The normalized weight computed from scratch with the reference (eval formula)."""
    w = _original(layer).detach()
    if hasattr(layer, "weight_u"):
        sigma = layer.weight_u @ reference.matricize(w, 0) @ layer.weight_v
        return w / sigma
    norm = layer.parametrizations.weight[0]
    if isinstance(norm, bsn_cuda.nn.BidirectionalSpectralNorm):
        return reference.bsn_forward(w, norm._u0, norm._v0, norm._u1, norm._v1, 1, norm.eps, 1.0, False)[0]
    return reference.sn_forward(w, norm._u, norm._v, norm.dim, 1, norm.eps, 1.0, False)[0]


@pytest.mark.parametrize("kind", ["sn", "bsn", "legacy"])
def test_unchanged_weight_is_not_recomputed_and_changes_are_seen(kind):
    layer = _layers()[kind].eval()
    with torch.no_grad():
        first = _weight(layer)
        assert _weight(layer) is first  # answered by the cache
        torch.testing.assert_close(first, _fresh(layer))

        _original(layer).mul_(2)  # the weight changed in place
        second = _weight(layer)
        assert second is not first
        torch.testing.assert_close(second, _fresh(layer))

        second.add_(1)  # the returned tensor itself changed
        third = _weight(layer)
        assert third is not second
        torch.testing.assert_close(third, _fresh(layer))

        _vectors(layer)[0].mul_(-1)  # a vector changed
        fourth = _weight(layer)
        assert fourth is not third
        torch.testing.assert_close(fourth, _fresh(layer))


@pytest.mark.parametrize("kind", ["sn", "bsn", "legacy"])
def test_training_and_recorded_graphs_never_use_the_cache(kind):
    layer = _layers()[kind].eval()
    with torch.no_grad():
        cached = _weight(layer)
    out = _weight(layer)  # grad enabled, weight requires grad: a graph is recorded
    assert out is not cached and out.requires_grad
    layer.train()
    trained = _weight(layer)  # training: iterates, vectors change
    assert trained is not cached
    layer.eval()
    with torch.no_grad():
        after = _weight(layer)
        assert after is not cached
        torch.testing.assert_close(after, _fresh(layer))


@pytest.mark.parametrize("kind", ["sn", "bsn", "legacy"])
def test_inference_mode_output_tracks_in_place_changes(kind):
    layer = _layers()[kind].eval()
    with torch.inference_mode():
        first = _weight(layer)
        assert not first.is_inference()  # a normal tensor, so that its version counter works
        assert _weight(layer) is first
        first.zero_()
        torch.testing.assert_close(_weight(layer), _fresh(layer))


def test_functional_call_with_other_vectors_is_not_answered_from_the_cache():
    from torch.func import functional_call

    layer = _layers()["sn"].eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        layer(x)  # fills the cache
        norm = layer.parametrizations.weight[0]
        other_u = -norm._u.clone()  # same version counter value as the buffer, another tensor
        out = functional_call(layer, {"parametrizations.weight.0._u": other_u}, (x,))
        expected = nn.functional.conv2d(x, _original(layer) / (other_u @ reference.matricize(_original(layer), 0)
                                                                 @ norm._v), layer.bias)
        torch.testing.assert_close(out, expected)


def test_cache_is_not_pickled():
    import copy

    layer = _layers()["sn"].eval()
    with torch.no_grad():
        cached = _weight(layer)
    clone = copy.deepcopy(layer)
    assert clone.parametrizations.weight[0]._cache is None
    with torch.no_grad():
        torch.testing.assert_close(_weight(clone), cached)
