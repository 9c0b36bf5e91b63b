"""Speed benchmark of bsn_cuda's fused spectral normalization against PyTorch.

Run ``python -m bsn_cuda.benchmark --help`` for the options. What it measures:

* Suites of real models' layer shapes (PyTorch layout ``[c_out, c_in, kh, kw]``;
  linear ``[out, in]``; embedding ``[num, dim]``), see ``SUITES``.
* Implementations, all applied to a copy of the same module: torch's two SN
  flavours, compiled torch SN, a plain-PyTorch BSN, and bsn_cuda's fused SN,
  legacy SN and BSN (see :mod:`.impls`).
* Modes: ``train`` (module.train(), grad enabled, read the weight), ``eval``
  (module.eval() under torch.no_grad()), ``fwd_bwd`` (train forward, then
  ``W_sn.backward(G)`` with a fixed random G; grads are set to None outside
  the timed region).
* Timing on the CPU and on CUDA (see :mod:`.timing`); the host overhead of one
  call on tiny weights (:mod:`.host_overhead`); one end-to-end discriminator
  training step (:mod:`.e2e`).

Fused numbers are only called "fused" when the compiled ops serve the device;
when bsn_cuda runs on its pure-PyTorch reference (``HAS_EXTENSION`` False) they
are labelled "reference fallback" everywhere and the goals are not judged.

Modules, one job each: ``suites`` (what is measured, the goals), ``impls`` (the
implementations), ``timing``, ``measure`` (running the suites), ``summary``
(ratios, geometric means, goals judged), ``e2e`` (the end-to-end model),
``host_overhead``, ``environment``, ``tables`` (text and markdown tables),
``report`` (the report's sections), ``readme`` and ``markers`` (README blocks),
``plot`` (the figures), ``cli`` (``python -m bsn_cuda.benchmark``), and the
stand-alone runs ``model_step``, ``build_time``, ``host_profile`` (where one
call's host time goes) and ``bsn_cost`` (where BSN's extra kernel time goes).
Imports go one way (no cycle; tests/docs/test_import_graph.py).
"""

from .e2e import E2E_VARIANTS
from .impls import fused_native, has_extension, impl_title, make_case, make_impl, make_layer
from .suites import ALL_SUITES, DEFAULT_IMPLS, FUSED, IMPLS, MODES, SUITES, merge_layers

_LAZY = {"main": "cli", "run": "cli", "build_parser": "cli", "to_markdown": "report"}


def __getattr__(name):
    # The command line and the report import host_overhead: loaded on first use, so
    # that `python -m bsn_cuda.benchmark.host_overhead` runs a module not yet imported.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["SUITES", "ALL_SUITES", "IMPLS", "DEFAULT_IMPLS", "FUSED", "MODES", "E2E_VARIANTS", "main", "run",
           "build_parser", "make_layer", "make_impl", "make_case", "fused_native", "has_extension", "impl_title",
           "merge_layers", "to_markdown"]
