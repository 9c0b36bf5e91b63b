"""bsn_cuda.nn.utils mirrors torch.nn.utils, and bsn_cuda.patch_torch() swaps torch's own names.

* every ``from torch.nn.utils[.submodule] import ...`` line can be swapped whole:
  every name is torch's object except the spectral norms, which are ours;
* the module path ``bsn_cuda.nn.utils.spectral_norm`` mirrors torch's
  (``SpectralNorm``, ``SpectralNorm.apply``, the state-dict hooks, subclasses);
* assigning ours over torch's names cannot recurse (torch's originals are bound
  at import);
* ``patch_torch()`` reaches third-party-style files imported after it, and its
  undo and context-manager forms restore torch's originals.

Each of these failed on eb13708 (ModuleNotFoundError, ImportError, RecursionError,
or a subclass's compute_weight skipped in training).
"""

import importlib.util
import itertools
import pathlib
import sys

import pytest
import torch
import torch.nn.utils.spectral_norm  # noqa: F401
from torch import nn

import bsn_cuda
from bsn_cuda.nn.legacy import FusedLegacySpectralNorm

TORCH_LEGACY_MODULE = sys.modules["torch.nn.utils.spectral_norm"]
THIRD_PARTY = pathlib.Path(__file__).parent / "third_party"
OUR_NAMES = {"spectral_norm", "remove_spectral_norm", "parametrizations"}

_counter = itertools.count()


def _import_fresh(name):
    """Load tests/module/third_party/<name>.py as a new module, as a first import would."""
    spec = importlib.util.spec_from_file_location(f"third_party_{name}_{next(_counter)}", THIRD_PARTY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fused_op_calls(fn):
    """How many fused SN ops ``fn()`` ran (profiler events of bsn_cuda::sn_forward / bsn_forward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in ("bsn_cuda::sn_forward", "bsn_cuda::bsn_forward"))


def _legacy_hooks(model):
    return [h for m in model.modules() for h in m._forward_pre_hooks.values()
            if isinstance(h, TORCH_LEGACY_MODULE.SpectralNorm)]


@pytest.fixture(autouse=True)
def _torch_names_restored():
    """Every test leaves torch's names as it found them."""
    yield
    bsn_cuda.unpatch_torch()
    assert not bsn_cuda.is_torch_patched()
    assert torch.nn.utils.spectral_norm is TORCH_LEGACY_MODULE.spectral_norm


# ---------------------------------------------------------------------------
# The mirror


def test_utils_mirrors_every_name_of_torch_nn_utils():
    ours = bsn_cuda.nn.utils
    names = [n for n in dir(torch.nn.utils) if not n.startswith("__")]
    assert "weight_norm" in names and "clip_grad_norm_" in names
    for name in names:
        if name in OUR_NAMES:
            continue
        assert getattr(ours, name) is getattr(torch.nn.utils, name), name
    assert set(torch.nn.utils.__all__) <= set(ours.__all__)
    assert ours.spectral_norm is bsn_cuda.nn.legacy.spectral_norm  # a function, callable as before
    for name in dir(torch.nn.utils.parametrizations):
        if not name.startswith("__") and name != "spectral_norm":
            assert getattr(ours.parametrizations, name) is getattr(torch.nn.utils.parametrizations, name), name


IMPORT_LINES = [
    "from torch.nn.utils import weight_norm, remove_weight_norm, spectral_norm",  # HiFi-GAN
    "from torch.nn.utils import spectral_norm, remove_spectral_norm",
    "from torch.nn.utils.spectral_norm import spectral_norm",
    "from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormStateDictHook, SpectralNormLoadStateDictPreHook",
    "from torch.nn.utils.parametrizations import spectral_norm, orthogonal, weight_norm",
    "from torch.nn.utils.parametrize import register_parametrization, cached, remove_parametrizations",
    "from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence",
    "from torch.nn.utils import prune",
    "from torch.nn.utils.prune import l1_unstructured",
    "from torch.nn.utils.weight_norm import WeightNorm",
    "from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters",
    "from torch.nn.utils.stateless import functional_call",
]
OURS_BY_LINE = {"spectral_norm", "remove_spectral_norm", "SpectralNorm"}


@pytest.mark.parametrize("line", IMPORT_LINES)
def test_import_lines_swap_whole(line):
    theirs, ours = {}, {}
    exec(line, theirs)  # noqa: S102 - the literal import lines of user code
    exec(line.replace("torch.nn.utils", "bsn_cuda.nn.utils"), ours)  # noqa: S102
    names = [n for n in theirs if n != "__builtins__"]
    assert names and set(names) == {n for n in ours if n != "__builtins__"}
    for name in names:
        if name in OURS_BY_LINE:
            assert ours[name] is not theirs[name], name
        else:
            assert ours[name] is theirs[name], name
    # Importing a submodule under our name leaves both namespaces as they were.
    assert bsn_cuda.nn.utils.weight_norm is torch.nn.utils.weight_norm  # the function, not the module
    assert callable(bsn_cuda.nn.utils.spectral_norm)
    assert torch.nn.utils.rnn.__name__ == "torch.nn.utils.rnn"


def test_lazily_imported_torch_submodule_keeps_its_identity():
    from bsn_cuda.nn.utils import prune as ours

    import torch.nn.utils.prune as theirs

    assert ours is theirs and theirs.__name__ == theirs.__spec__.name == "torch.nn.utils.prune"


# ---------------------------------------------------------------------------
# The legacy module path


def test_spectral_norm_apply_runs_fused_and_matches_torch():
    from bsn_cuda.nn.utils.spectral_norm import SpectralNorm

    x = torch.randn(2, 3, 6, dtype=torch.float64)
    outs = []
    for cls in (TORCH_LEGACY_MODULE.SpectralNorm, SpectralNorm):
        torch.manual_seed(0)
        conv = nn.Conv1d(3, 4, 3).double()
        fn = cls.apply(conv, "weight", 1, 0, 1e-12)
        assert type(fn) is cls and {"weight_orig", "weight_u", "weight_v"} <= set(conv.state_dict())
        outs.append((conv(x), conv(x), conv.weight_u.clone()))
    fused = outs[1]
    torch.testing.assert_close(fused, outs[0])
    assert _fused_op_calls(lambda: conv(x)) == 1
    with pytest.raises(RuntimeError, match="two spectral_norm hooks"):
        SpectralNorm.apply(conv, "weight", 1, 0, 1e-12)
    fn.remove(conv)
    assert isinstance(conv.weight, torch.Tensor) and "weight_orig" not in conv._parameters


def test_subclass_overriding_compute_weight_is_used_in_training():
    """The training fast path must not skip a subclass's compute_weight (it did on eb13708)."""
    x = torch.randn(2, 5, dtype=torch.float64)
    results = []
    with bsn_cuda.patch_torch():
        due_fused = _import_fresh("due_style")
    due_torch = _import_fresh("due_style")
    assert issubclass(due_fused.SoftBoundSpectralNorm, FusedLegacySpectralNorm)
    assert not issubclass(due_torch.SoftBoundSpectralNorm, FusedLegacySpectralNorm)
    for module in (due_torch, due_fused):
        torch.manual_seed(1)
        layer = module.soft_bound(nn.Linear(5, 4).double(), coeff=0.5)
        with torch.no_grad():
            layer.weight_orig.mul_(4)  # sigma well above coeff: the bound is active
        out = layer(x)
        sigma = torch.linalg.matrix_norm(layer.weight_orig.detach(), ord=2)
        results.append((out, layer.weight.detach(), layer.weight_u.clone()))
    torch.testing.assert_close(results[1], results[0])
    # The subclass's formula, not plain SN: ||W_hat||_2 is coeff, not 1.
    assert abs(torch.linalg.matrix_norm(results[1][1], ord=2) - 0.5) < 0.05 * sigma
    assert issubclass(due_fused.VersionedStateDictHook, TORCH_LEGACY_MODULE.SpectralNormStateDictHook)


def test_literal_import_of_the_module_path():
    from bsn_cuda.nn.utils.spectral_norm import spectral_norm as from_module

    assert from_module is bsn_cuda.nn.utils.spectral_norm
    assert sys.modules["bsn_cuda.nn.utils.spectral_norm"].SpectralNorm is FusedLegacySpectralNorm


# ---------------------------------------------------------------------------
# Global assignment and patch_torch


def test_global_assignment_of_our_functions_does_not_recurse(monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "spectral_norm", bsn_cuda.nn.utils.spectral_norm)
    monkeypatch.setattr(torch.nn.utils, "remove_spectral_norm", bsn_cuda.nn.utils.remove_spectral_norm)
    monkeypatch.setattr(TORCH_LEGACY_MODULE, "spectral_norm", bsn_cuda.nn.utils.spectral_norm)
    monkeypatch.setattr(TORCH_LEGACY_MODULE, "SpectralNorm", FusedLegacySpectralNorm)
    monkeypatch.setattr(torch.nn.utils.parametrizations, "spectral_norm", bsn_cuda.spectral_norm)
    layer = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    assert _fused_op_calls(lambda: layer(torch.randn(2, 3))) == 1
    torch.nn.utils.remove_spectral_norm(layer)
    assert isinstance(layer.weight, nn.Parameter)
    p = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4))
    bsn_cuda.remove_spectral_norm(bsn_cuda.nn.utils.spectral_norm(bsn_cuda.remove_spectral_norm(p)))


@pytest.mark.parametrize("style", ["sngan_style", "hifigan_style", "stylegan_t_style", "parametrized_style"])
def test_patch_torch_reaches_code_imported_after_it(style):
    x = {"sngan_style": torch.randn(2, 3, 8, 8), "hifigan_style": torch.randn(2, 1, 16),
         "stylegan_t_style": torch.randn(2, 4, 7), "parametrized_style": torch.randn(2, 6)}[style]
    handle = bsn_cuda.patch_torch()
    assert bsn_cuda.is_torch_patched()
    patched = _import_fresh(style)
    torch.manual_seed(0)
    fused = patched.build()
    handle.undo()
    assert not bsn_cuda.is_torch_patched()
    plain = _import_fresh(style)
    torch.manual_seed(0)
    reference = plain.build()
    assert all(type(h) is FusedLegacySpectralNorm for h in _legacy_hooks(fused))
    assert not any(isinstance(h, FusedLegacySpectralNorm) for h in _legacy_hooks(reference))
    n_norms = len(_legacy_hooks(fused)) + sum(
        isinstance(p, bsn_cuda.nn.SpectralNorm) for m in fused.modules() if hasattr(m, "parametrizations")
        for p in m.parametrizations.weight)
    assert n_norms >= 1 and _fused_op_calls(lambda: fused(x)) == n_norms
    # The same registration (RNG draws, keys) and the same outputs as torch's, step after step.
    torch.manual_seed(0)
    fused = patched.build()
    assert fused.state_dict().keys() == reference.state_dict().keys()
    for _ in range(2):
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-6)
    # Undone: the module imported before the undo keeps what it bound, new imports get torch's.
    assert _fused_op_calls(lambda: plain.build()(x)) == 0


def test_patch_torch_as_a_context_manager_nests_and_unpatch_closes_all():
    original = torch.nn.utils.spectral_norm
    with bsn_cuda.patch_torch() as outer:
        assert torch.nn.utils.spectral_norm is bsn_cuda.nn.utils.spectral_norm
        assert TORCH_LEGACY_MODULE.SpectralNorm is FusedLegacySpectralNorm
        assert torch.nn.utils.parametrizations.spectral_norm is bsn_cuda.spectral_norm
        with bsn_cuda.patch_torch():
            pass
        assert bsn_cuda.is_torch_patched()  # the outer patch is still open
        assert "open" in repr(outer)
    assert torch.nn.utils.spectral_norm is original and not bsn_cuda.is_torch_patched()
    first, second = bsn_cuda.patch_torch(), bsn_cuda.patch_torch()
    bsn_cuda.unpatch_torch()
    assert not bsn_cuda.is_torch_patched()
    third = bsn_cuda.patch_torch()
    first.undo()
    second.undo()  # closed by unpatch_torch: no effect on the newer patch
    assert bsn_cuda.is_torch_patched()
    third.undo()
    third.undo()  # idempotent
    assert not bsn_cuda.is_torch_patched()
