"""End-to-end: one discriminator training step (hinge loss, Adam) of the SNGAN
ResNet CIFAR-10 discriminator (ch=128) without SN, with torch SN, plain torch
BSN, fused SN and fused BSN."""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .impls import bsn_package, impl_title, register_reference_bsn
from .suites import FUSED, IMPL_TITLES, bsn_effective
from .timing import CONTENTION_LIMIT, CONTENTION_RETRIES, contention, cpu_ticks, gc_off, stats, wait_for_quiet

__all__ = ["SNGANResNetD", "E2E_VARIANTS", "apply_variant", "run_e2e", "e2e_layer_estimates"]


class _OptimizedDisBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.sc(F.avg_pool2d(x, 2))


class _DisBlock(nn.Module):
    def __init__(self, cin, cout, down):
        super().__init__()
        self.down = down
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1) if (down or cin != cout) else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = x if self.sc is None else self.sc(x)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class SNGANResNetD(nn.Module):
    """SNGAN ResNet discriminator for 32x32 (Miyato et al. 2018), ch=128:
    optimized block (down), block (down), block, block, ReLU, global sum
    pooling, linear to 1. Its SN weights are the sngan_resnet suite minus the
    projection embedding."""

    def __init__(self, ch=128):
        super().__init__()
        self.blocks = nn.Sequential(
            _OptimizedDisBlock(3, ch), _DisBlock(ch, ch, True), _DisBlock(ch, ch, False), _DisBlock(ch, ch, False)
        )
        self.l5 = nn.Linear(ch, 1)

    def forward(self, x):
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.l5(h)


E2E_VARIANTS = ["none", "torch_sn", "torch_bsn", "fused_sn", "fused_bsn"]


def _sn_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]


def apply_variant(model, variant):
    """Apply an SN variant to every conv/linear of a copy of the model."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "none":
            pass
        elif variant == "torch_sn":
            for m in _sn_layers(model):
                torch.nn.utils.parametrizations.spectral_norm(m)
        elif variant == "torch_bsn":
            for m in _sn_layers(model):
                register_reference_bsn(m)
        elif variant in ("fused_sn", "fused_bsn"):
            bsn = bsn_package()
            for m in _sn_layers(model):
                if variant == "fused_sn" or not bsn_effective(tuple(m.weight.shape)):
                    bsn.spectral_norm(m)
                else:
                    bsn.bidirectional_spectral_norm(m)
        else:
            raise ValueError(f"apply_variant: expected one of {', '.join(E2E_VARIANTS)}, got {variant!r}")
    return model


def run_e2e(device, dtype, batch, warmup, reps, progress, native, retries=CONTENTION_RETRIES):
    """Time one D training step per variant. Returns a list of records."""
    torch.manual_seed(0)
    base = SNGANResNetD(128).to(device=device, dtype=dtype)
    real = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    fake = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    x = torch.cat([real, fake])
    out = []
    for variant in E2E_VARIANTS:
        rec = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "variant": variant,
               "batch": batch, "label": impl_title(variant, native) if variant in IMPL_TITLES else "no SN",
               "fused_native": native if variant in FUSED else None}
        try:
            model = apply_variant(base, variant).train()
            opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.0, 0.9))

            def step():
                opt.zero_grad(set_to_none=True)
                d = model(x)
                loss = F.relu(1.0 - d[:batch]).mean() + F.relu(1.0 + d[batch:]).mean()
                loss.backward()
                opt.step()

            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            for _ in range(warmup):
                step()
            sync()
            for attempt in range(1 + (retries if device.type == "cpu" else 0)):
                times = []
                ticks0, wall0 = cpu_ticks(), time.perf_counter()
                with gc_off():
                    for _ in range(reps):
                        t = time.perf_counter()
                        step()
                        sync()
                        times.append(time.perf_counter() - t)
                st = stats(times)
                st["tries"] = attempt + 1
                if device.type == "cpu":
                    st["contention"] = contention(ticks0, cpu_ticks(), time.perf_counter() - wall0)
                    st["contended"] = (st["contention"] or 0) > CONTENTION_LIMIT
                if attempt == 0 or (not st.get("contended"), -st["median_s"]) > (not rec.get("contended"), -rec["median_s"]):
                    rec.update(st)
                if not st.get("contended"):
                    break
                wait_for_quiet(30.0)
            del model, opt
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        out.append(rec)
        progress.update(f"e2e {variant}")
    none = next((r for r in out if r["variant"] == "none" and "median_s" in r), None)
    tsn = next((r for r in out if r["variant"] == "torch_sn" and "median_s" in r), None)
    for r in out:
        if "median_s" not in r:
            continue
        if none is not None and r["variant"] != "none":
            r["sn_overhead_s"] = r["median_s"] - none["median_s"]
            r["sn_share"] = r["sn_overhead_s"] / r["median_s"]
        if tsn is not None:
            r["step_speedup_vs_torch_sn"] = tsn["median_s"] / r["median_s"]
    return out


def e2e_layer_estimates(result):
    """SN cost per D step predicted from the sngan_resnet suite (fwd_bwd, the
    conv and linear layers with their counts; the embedding is not in this D)."""
    for r in result["e2e"]:
        if r["variant"] == "none":
            continue
        recs = [m for m in result["measurements"] if m["suite"] == "sngan_resnet" and m["mode"] == "fwd_bwd"
                and m["device"] == r["device"] and m["impl"] == r["variant"] and m["kind"] != "embedding"]
        if recs and all("median_s" in m for m in recs):
            r["sn_cost_from_layers_s"] = sum(m["median_s"] * m["count"] for m in recs)
            if "median_s" in r:
                r["sn_share_from_layers"] = r["sn_cost_from_layers_s"] / r["median_s"]
