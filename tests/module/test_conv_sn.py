"""Strict spectral norm of a convolution (bsn_cuda.conv_spectral_norm).

Oracle: the dense matrix of the convolution, built by applying the module's
own convolution (torch.nn.functional, not our operator) to every basis vector,
and its exact 2-norm from torch.linalg.matrix_norm(ord=2).
"""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import bsn_cuda
from bsn_cuda.nn.conv_sn import ConvOperator, conv_operator_norm, get_conv_sigma


def _transpose_forward(module, x, weight):
    # ConvTranspose modules have no _conv_forward; call the functional with the module's settings.
    f = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
         3: torch.nn.functional.conv_transpose3d}[len(module.kernel_size)]
    return f(x, weight, None, module.stride, module.padding, module.output_padding, module.groups, module.dilation)


def dense(module, input_shape, weight):
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=weight.dtype).reshape((n,) + tuple(input_shape))
    with torch.no_grad():
        if module.transposed:
            out = _transpose_forward(module, basis, weight)
        else:
            out = module._conv_forward(basis, weight, None)
    return out.reshape(n, -1).t()


def exact_norm(module, input_shape, weight):
    return torch.linalg.matrix_norm(dense(module, input_shape, weight), ord=2).item()


CASES = [
    ("conv2d_s1_p1", lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 6)),
    ("conv2d_s2_p1_k4", lambda: nn.Conv2d(2, 3, 4, stride=2, padding=1), (2, 8, 7)),
    ("conv2d_s2_p0_odd", lambda: nn.Conv2d(2, 3, 3, stride=2), (2, 7, 8)),
    ("conv2d_s3_p2", lambda: nn.Conv2d(2, 2, 3, stride=3, padding=2), (2, 7, 5)),
    ("conv2d_groups", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
    ("conv2d_dilation", lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 6, 6)),
    ("conv2d_same_even", lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 5, 6)),
    ("conv2d_valid", lambda: nn.Conv2d(2, 3, (2, 3), padding="valid"), (2, 4, 5)),
    ("conv2d_rect_stride", lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 6, 5)),
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 11)),
    ("conv3d", lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), (2, 4, 5, 3)),
    ("convT2d", lambda: nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (3, 4, 5)),
    ("convT2d_outpad_dil", lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, dilation=2), (3, 4, 3)),
    ("convT1d_groups", lambda: nn.ConvTranspose1d(4, 4, 3, stride=2, groups=2), (4, 6)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_adjoint_matches_dense_transpose(name, make, shape):
    torch.manual_seed(0)
    module = make().double()
    w = module.weight.detach()
    op = ConvOperator(module, shape)
    A = dense(module, shape, w)
    m = A.shape[0]
    basis = torch.eye(m, dtype=torch.float64).reshape((m,) + op.output_shape)
    AT = op.adjoint(basis, w).reshape(m, -1)
    torch.testing.assert_close(AT, A, rtol=0, atol=1e-12)
    assert (1,) + op.output_shape == tuple(op.apply(torch.zeros((1,) + shape, dtype=torch.float64), w).shape)


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_converges_to_exact_operator_norm(name, make, shape):
    torch.manual_seed(1)
    module = make().double()
    w = module.weight.detach().clone()
    exact = exact_norm(module, shape, w)
    bsn_cuda.conv_spectral_norm(module, shape, n_power_iterations=400, scale=1.5)
    out = module.weight  # training mode: 400 iterations then normalize
    sigma = get_conv_sigma(module).item()
    assert sigma == pytest.approx(exact, rel=1e-6)
    torch.testing.assert_close(out, w * (1.5 / sigma), rtol=1e-12, atol=0)
    # The normalized map has operator norm `scale`.
    assert exact_norm(module, shape, out.detach()) == pytest.approx(1.5, rel=1e-6)
    # From a random start the estimate approaches the norm from below (slowly when the
    # top two singular values are close, hence the loose lower tolerance).
    estimate = conv_operator_norm(module, shape, n_power_iterations=400).item()
    assert 1.5 * 0.98 < estimate <= 1.5 * (1 + 1e-9)


def _has_interior_window(n, k, s, p):
    # An output position whose whole receptive field lies inside the input (no padding).
    out = (n + 2 * p - k) // s + 1
    return any(s * o - p >= 0 and s * o - p + k <= n for o in range(out))


def test_bounds_sn_strict_random_configs():
    """For zero padding, groups=1, dilation=1 (Conv2d):
    sigma(W_mat(0)) <= sigma_strict          if some output window lies inside the input,
    sigma_strict <= sqrt(ceil(kh/sh) * ceil(kw/sw)) * sigma(W_mat(0))   always."""
    g = torch.Generator().manual_seed(2)
    checked_lower = 0
    ratios = []
    for _ in range(60):
        kh, kw = (int(x) for x in torch.randint(1, 5, (2,), generator=g))
        sh, sw = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
        ph, pw = (int(x) for x in torch.randint(0, 3, (2,), generator=g))
        h, w = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        if h + 2 * ph < kh or w + 2 * pw < kw:
            continue
        cin, cout = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
        module = nn.Conv2d(cin, cout, (kh, kw), stride=(sh, sw), padding=(ph, pw)).double()
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=g, dtype=torch.float64))
        wt = module.weight.detach()
        strict = exact_norm(module, (cin, h, w), wt)
        sn = torch.linalg.matrix_norm(wt.reshape(cout, -1), ord=2).item()
        bound = math.sqrt(math.ceil(kh / sh) * math.ceil(kw / sw))
        assert strict <= bound * sn * (1 + 1e-10)
        ratios.append(strict / sn)
        if _has_interior_window(h, kh, sh, ph) and _has_interior_window(w, kw, sw, pw):
            assert strict >= sn * (1 - 1e-10)
            checked_lower += 1
    assert checked_lower >= 20
    assert max(ratios) > 1.2  # the bound is not vacuous: strict can exceed sigma_SN by a lot


def test_upper_bound_is_nearly_tight_for_constant_kernel():
    # A kernel that is the same matrix at every tap, on a large input with stride 1,
    # gains about k*k on a constant image, i.e. sqrt(k*k) times sigma(W_mat(0)).
    module = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        module.weight.fill_(1.0)
    strict = exact_norm(module, (1, 16, 16), module.weight.detach())
    sn = 3.0  # ||ones(1, 9)||
    assert sn * 2.9 < strict <= 3 * sn


def test_lower_bound_needs_an_interior_window():
    # 1x1 input, 3x3 kernel, padding 1: only the centre tap touches the input, so the
    # strict norm is sigma(W[:, :, 1, 1]), below sigma(W_mat(0)) for a generic kernel.
    torch.manual_seed(3)
    module = nn.Conv2d(2, 3, 3, padding=1).double()
    w = module.weight.detach()
    strict = exact_norm(module, (2, 1, 1), w)
    assert strict == pytest.approx(torch.linalg.matrix_norm(w[:, :, 1, 1], ord=2).item(), rel=1e-12)
    assert strict < torch.linalg.matrix_norm(w.reshape(3, -1), ord=2).item() * 0.99


def test_groups_upper_bound_and_blockwise_lower_bound():
    # groups > 1: the operator is block-diagonal over groups; its norm is the largest block's.
    # sigma(W_mat(0)) stacks the blocks' rows, so it can exceed the strict norm; the upper bound stays.
    torch.manual_seed(4)
    module = nn.Conv2d(4, 4, 3, padding=1, groups=4).double()
    with torch.no_grad():
        module.weight.copy_(torch.randn(1, 1, 3, 3, dtype=torch.float64).expand(4, 1, 3, 3))
    w = module.weight.detach()
    strict = exact_norm(module, (4, 6, 6), w)
    sn = torch.linalg.matrix_norm(w.reshape(4, -1), ord=2).item()
    block = exact_norm(nn.Conv2d(1, 1, 3, padding=1).double(), (1, 6, 6), w[:1])
    assert strict == pytest.approx(block, rel=1e-10)
    assert strict <= 3 * sn
    assert sn > strict  # identical depthwise filters: sigma(W_mat(0)) = 2 * ||filter|| > strict here


def test_train_updates_eval_does_not():
    torch.manual_seed(5)
    module = bsn_cuda.conv_spectral_norm(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6))
    p = module.parametrizations.weight[0]
    u0, v0 = p._u.clone(), p._v.clone()
    module.train()
    module.weight
    assert not torch.equal(p._v, v0) and not torch.equal(p._u, u0)
    module.eval()
    u1, v1 = p._u.clone(), p._v.clone()
    w_eval = module.weight
    assert torch.equal(p._u, u1) and torch.equal(p._v, v1)
    raw = module.parametrizations.weight.original
    op = ConvOperator(module, (3, 6, 6))
    sigma = (u1 * op.apply(v1, raw.detach())).sum()
    torch.testing.assert_close(w_eval, raw / sigma)
    # Two forwards then one backward (D on real and fake) must not trip autograd's version check.
    module.train()
    x = torch.randn(2, 3, 6, 6)
    (module(x).sum() + module(x).sum()).backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()


def test_gradient_matches_finite_differences():
    torch.manual_seed(6)
    module = bsn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3, stride=2, padding=1).double(), (2, 5, 5), scale=1.3)
    module.eval()  # u, v fixed: the parametrization is a function of W alone
    p = module.parametrizations.weight[0]
    w = module.parametrizations.weight.original.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda x: p(x), (w,))


def test_state_dict_round_trip():
    torch.manual_seed(7)
    a = bsn_cuda.conv_spectral_norm(nn.Conv2d(3, 4, 4, stride=2, padding=1), (3, 8, 8), scale=1.4)
    a.train()
    for _ in range(3):
        a.weight
    sd = a.state_dict()
    assert {"parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"} <= set(sd)
    assert sd["parametrizations.weight.0._v"].shape == (1, 3, 8, 8)
    assert sd["parametrizations.weight.0._u"].shape == (1, 4, 4, 4)
    torch.manual_seed(8)
    b = bsn_cuda.conv_spectral_norm(nn.Conv2d(3, 4, 4, stride=2, padding=1), (3, 8, 8), scale=1.4)
    b.load_state_dict(sd)
    a.eval()
    b.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    c = bsn_cuda.conv_spectral_norm(nn.Conv2d(3, 4, 4, stride=2, padding=1), (3, 6, 6))
    with pytest.raises(RuntimeError, match="size mismatch"):
        c.load_state_dict(sd)  # vectors for another input size


def test_whole_module_pickles(tmp_path):
    torch.manual_seed(9)
    model = nn.Sequential(bsn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)), nn.ReLU())
    model.eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert parametrize.is_parametrized(loaded[0], "weight")


def test_zero_and_nonfinite_weights():
    module = bsn_cuda.conv_spectral_norm(nn.Conv2d(2, 2, 3, padding=1), (2, 4, 4), scale=2.0)
    p = module.parametrizations.weight[0]
    u0, v0 = p._u.clone(), p._v.clone()
    with torch.no_grad():
        module.parametrizations.weight.original.zero_()
    out = module.weight
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(p._u, u0) and torch.equal(p._v, v0)
    with torch.no_grad():
        module.parametrizations.weight.original.fill_(float("nan"))
    module.weight
    assert torch.equal(p._u, u0) and torch.equal(p._v, v0)


def test_remove_parametrization_keeps_normalized_weight():
    module = bsn_cuda.conv_spectral_norm(nn.Conv2d(2, 2, 3), (2, 5, 5))
    module.eval()
    expected = module.weight.detach().clone()
    parametrize.remove_parametrizations(module, "weight")
    torch.testing.assert_close(module.weight.detach(), expected)


@pytest.mark.parametrize(
    "make,shape,exc,match",
    [
        (lambda: nn.Conv2d(3, 4, 3), (3, 8), ValueError, r"expected input_shape of length 3 \(C, H, W\).*got \(3, 8\)"),
        (lambda: nn.Conv2d(3, 4, 3), (1, 3, 8, 8), ValueError, "no batch dimension"),
        (lambda: nn.Conv2d(3, 4, 3), (4, 8, 8), ValueError, r"input_shape\[0\] == in_channels = 3, got 4"),
        (lambda: nn.Conv2d(3, 4, 3), (3, 0, 8), ValueError, "positive sizes"),
        (lambda: nn.Conv2d(3, 4, 5), (3, 4, 8), ValueError, "output would be empty"),
        (lambda: nn.Conv2d(3, 4, 3), (3, 8.0, 8), TypeError, "tuple of ints"),
        (lambda: nn.Conv2d(3, 4, 3), 8, TypeError, "tuple of ints"),
        (lambda: nn.Conv1d(3, 4, 3), (3, 8, 8), ValueError, r"length 2 \(C, L\)"),
        (lambda: nn.Linear(3, 4), (3,), TypeError, "expected a Conv1d/2d/3d or ConvTranspose1d/2d/3d module, got Linear"),
        (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8), ValueError, "padding_mode='zeros', got 'reflect'"),
    ],
)
def test_errors(make, shape, exc, match):
    with pytest.raises(exc, match=match):
        bsn_cuda.conv_spectral_norm(make(), shape)


def test_errors_hyperparameters_and_double_registration():
    with pytest.raises(ValueError, match="expected n_power_iterations >= 1, got 0"):
        bsn_cuda.conv_spectral_norm(nn.Conv2d(1, 1, 3), (1, 4, 4), n_power_iterations=0)
    with pytest.raises(ValueError, match="expected scale > 0 and finite, got -1"):
        bsn_cuda.conv_spectral_norm(nn.Conv2d(1, 1, 3), (1, 4, 4), scale=-1)
    with pytest.raises(ValueError, match="expected eps > 0 and finite, got 0"):
        bsn_cuda.conv_spectral_norm(nn.Conv2d(1, 1, 3), (1, 4, 4), eps=0)
    with pytest.raises(TypeError, match="expected n_power_iterations to be an int, got float"):
        bsn_cuda.conv_spectral_norm(nn.Conv2d(1, 1, 3), (1, 4, 4), n_power_iterations=1.0)
    m = bsn_cuda.conv_spectral_norm(nn.Conv2d(1, 1, 3), (1, 4, 4))
    with pytest.raises(ValueError, match="already has one"):
        bsn_cuda.conv_spectral_norm(m, (1, 4, 4))
    with pytest.raises(ValueError, match="expected a module with conv_spectral_norm"):
        get_conv_sigma(nn.Conv2d(1, 1, 3))
