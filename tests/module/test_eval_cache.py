"""Eval forwards return the current weight, whatever way it was written, and the
opt-in cache (``bsn_cuda.cached()``, bsn_cuda/nn/eval_cache.py) reuses the last
output only inside its context and only while nothing it can observe changed."""

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


KINDS = ["sn", "bsn", "legacy"]


def _write(layer, how, generator):
    """Change the weight (or u) the way user code does, bypassing version counters where it does."""
    p = _original(layer)
    new = torch.randn(p.shape, generator=generator) * 5
    if how == "data_copy":  # EMA (BigGAN, ema-pytorch), FastGAN's load_params
        p.data.copy_(new)
    elif how == "data_assign":
        p.data = new
    elif how == "vector_to_parameters":
        torch.nn.utils.vector_to_parameters(new.flatten(), [p])
    elif how == "data_clamp":  # WGAN weight clipping
        p.data.clamp_(-0.01, 0.01)
    elif how == "u_data_copy":
        u = _vectors(layer)[0]
        u.data.copy_(nn.functional.normalize(torch.randn(u.shape, generator=generator), dim=0))
    else:
        raise AssertionError(how)


def _context(name):
    return torch.inference_mode() if name == "inference_mode" else torch.no_grad()


WRITES = ["data_copy", "data_assign", "vector_to_parameters", "data_clamp", "u_data_copy"]


@pytest.mark.parametrize("how", WRITES)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_sees_every_kind_of_write(kind, context, how):
    # Failed on eb13708: the eval cache (then on by default, keyed on versions)
    # returned the weight normalized before a .data write.
    layer = _layers()[kind].eval()
    x = torch.randn(1, 3, 5, 5)
    g = torch.Generator().manual_seed(1)
    with _context(context):
        layer(x)
        layer(x)
    _write(layer, how, g)
    with _context(context):
        out = layer(x)
    expected = nn.functional.conv2d(x, _fresh(layer), layer.bias)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_detached_copy_with_grad_enabled_sees_data_writes(kind):
    # EMA copies detach their parameters, so grad-enabled eval forwards record no
    # graph: the path the cache used to take even outside no_grad.
    layer = _layers()[kind].eval().requires_grad_(False)
    x = torch.randn(1, 3, 5, 5)
    layer(x)
    _original(layer).data.mul_(0.5).add_(1.0)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, _fresh(layer), layer.bias))


@pytest.mark.parametrize("kind", KINDS)
def test_no_cache_outside_the_context(kind):
    layer = _layers()[kind].eval()
    with torch.no_grad():
        assert _weight(layer) is not _weight(layer)
    assert _cache_of(layer) is None


def _cache_of(layer):
    if hasattr(layer, "weight_u"):
        return next(iter(layer._forward_pre_hooks.values()))._cache
    return layer.parametrizations.weight[0]._cache


@pytest.mark.parametrize("kind", KINDS)
def test_cached_reuses_an_unchanged_weight_and_sees_counted_changes(kind):
    layer = _layers()[kind].eval()
    with bsn_cuda.cached(), torch.no_grad():
        first = _weight(layer)
        assert _weight(layer) is first  # answered by the cache
        torch.testing.assert_close(first, _fresh(layer))

        _original(layer).mul_(2)  # the weight changed in place (its version counter moves)
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

        _original(layer).data = torch.randn(_original(layer).shape)  # new storage, same tensor and version
        fifth = _weight(layer)
        assert fifth is not fourth
        torch.testing.assert_close(fifth, _fresh(layer))
    assert _cache_of(layer) is None  # dropped with the context, and the tensors it held


def test_cached_nests_and_drops_entries_when_the_outermost_context_exits():
    layer = _layers()["sn"].eval()
    with bsn_cuda.cached(), torch.no_grad():
        first = _weight(layer)
        with bsn_cuda.cached():
            assert _weight(layer) is first
        assert _cache_of(layer) is not None and _weight(layer) is first
    assert _cache_of(layer) is None
    with torch.no_grad():
        assert _weight(layer) is not first


@pytest.mark.parametrize("kind", KINDS)
def test_training_and_recorded_graphs_never_use_the_cache(kind):
    layer = _layers()[kind].eval()
    with bsn_cuda.cached():
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


@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_output_tracks_in_place_changes(kind):
    layer = _layers()[kind].eval()
    with bsn_cuda.cached(), torch.inference_mode():
        first = _weight(layer)
        assert not first.is_inference()  # a normal tensor, so that its version counter works
        assert _weight(layer) is first
        first.zero_()
        torch.testing.assert_close(_weight(layer), _fresh(layer))


def test_functional_call_with_other_vectors_is_not_answered_from_the_cache():
    from torch.func import functional_call

    layer = _layers()["sn"].eval()
    x = torch.randn(1, 3, 5, 5)
    with bsn_cuda.cached(), torch.no_grad():
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
    with bsn_cuda.cached(), torch.no_grad():
        cached = _weight(layer)
        clone = copy.deepcopy(layer)
        assert clone.parametrizations.weight[0]._cache is None
        torch.testing.assert_close(_weight(clone), cached)
