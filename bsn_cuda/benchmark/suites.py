"""What the benchmark measures: the suites of layer shapes, the implementations,
the modes, the comparisons between them and the goals they are judged by."""

from __future__ import annotations

import torch

__all__ = [
    "SUITES", "E2E", "ALL_SUITES", "QUICK_SUITES", "IMPLS", "IMPL_TITLES", "FUSED", "MODES",
    "DEFAULT_IMPLS", "QUICK_IMPLS", "DTYPES", "COMPARISONS", "BSN_RATIO", "GOALS",
    "bsn_effective", "merge_layers", "VARIANT_SUITES", "VARIANT_IMPLS", "VARIANT_COMPARISONS",
]

# --------------------------------------------------------------------------
# Suites: (name, kind, shape, count). Identical (kind, shape) entries of a
# suite are measured once and weighted by the sum of their counts.
# --------------------------------------------------------------------------

SUITES = {
    "sngan_cnn": {
        "title": "SNGAN CNN discriminator, CIFAR-10",
        "layers": [
            ("c0", "conv", (64, 3, 3, 3), 1),
            ("c1", "conv", (64, 64, 4, 4), 1),
            ("c2", "conv", (128, 64, 3, 3), 1),
            ("c3", "conv", (128, 128, 4, 4), 1),
            ("c4", "conv", (256, 128, 3, 3), 1),
            ("c5", "conv", (256, 256, 4, 4), 1),
            ("c6", "conv", (512, 256, 3, 3), 1),
            ("l7", "linear", (1, 8192), 1),
        ],
    },
    "sngan_resnet": {
        "title": "SNGAN ResNet discriminator, CIFAR-10, ch=128",
        "layers": [
            ("b1.c1", "conv", (128, 3, 3, 3), 1),
            ("b1.c2", "conv", (128, 128, 3, 3), 1),
            ("b1.sc", "conv", (128, 3, 1, 1), 1),
            ("b2.c1-2", "conv", (128, 128, 3, 3), 2),
            ("b2.sc", "conv", (128, 128, 1, 1), 1),
            ("b3-4.c1-2", "conv", (128, 128, 3, 3), 4),
            ("l5", "linear", (1, 128), 1),
            ("embed", "embedding", (10, 128), 1),
        ],
    },
    "biggan_d": {
        "title": "BigGAN 128x128 discriminator, ch=96",
        "layers": [
            ("b1.c1", "conv", (96, 3, 3, 3), 1),
            ("b1.c2", "conv", (96, 96, 3, 3), 1),
            ("b1.sc", "conv", (96, 3, 1, 1), 1),
            ("attn.theta/phi", "conv", (12, 96, 1, 1), 2),
            ("attn.g", "conv", (48, 96, 1, 1), 1),
            ("attn.o", "conv", (96, 48, 1, 1), 1),
            ("b2.c1", "conv", (192, 96, 3, 3), 1),
            ("b2.c2", "conv", (192, 192, 3, 3), 1),
            ("b2.sc", "conv", (192, 96, 1, 1), 1),
            ("b3.c1", "conv", (384, 192, 3, 3), 1),
            ("b3.c2", "conv", (384, 384, 3, 3), 1),
            ("b3.sc", "conv", (384, 192, 1, 1), 1),
            ("b4.c1", "conv", (768, 384, 3, 3), 1),
            ("b4.c2", "conv", (768, 768, 3, 3), 1),
            ("b4.sc", "conv", (768, 384, 1, 1), 1),
            ("b5.c1", "conv", (1536, 768, 3, 3), 1),
            ("b5.c2", "conv", (1536, 1536, 3, 3), 1),
            ("b5.sc", "conv", (1536, 768, 1, 1), 1),
            ("b6.c1-2", "conv", (1536, 1536, 3, 3), 2),
            ("linear", "linear", (1, 1536), 1),
            ("embed", "embedding", (1000, 1536), 1),
        ],
    },
    "biggan_g_linear": {
        "title": "BigGAN 128 generator, SN linears (ch=96)",
        "layers": [
            ("linear0", "linear", (24576, 20), 1),
            ("bn1536", "linear", (1536, 148), 4),
            ("bn768", "linear", (768, 148), 4),
            ("bn384", "linear", (384, 148), 4),
            ("bn192", "linear", (192, 148), 4),
            ("bn96", "linear", (96, 148), 2),
        ],
    },
}
# The variants' own layers (issue 23), measured only on request (--suite):
# soft bound on a BERT-base's Linears (SNGP/DUE) and WRN-28-10's 3x3 convs,
# learnable scale on a ViT-S's Linears (sigmaReparam).
VARIANT_SUITES = {
    "bert_linear": {
        "title": "BERT-base, every Linear (12 layers: q, k, v, o, FFN in/out; pooler)",
        "layers": [
            ("attn.qkvo", "linear", (768, 768), 48),
            ("ffn.in", "linear", (3072, 768), 12),
            ("ffn.out", "linear", (768, 3072), 12),
            ("pooler", "linear", (768, 768), 1),
        ],
    },
    "vit_s_linear": {
        "title": "ViT-S/16, every block Linear (12 blocks)",
        "layers": [
            ("attn.qkv", "linear", (1152, 384), 12),
            ("attn.proj", "linear", (384, 384), 12),
            ("mlp.fc1", "linear", (1536, 384), 12),
            ("mlp.fc2", "linear", (384, 1536), 12),
        ],
    },
    "wrn_conv": {
        "title": "WRN-28-10 3x3 convolutions",
        "layers": [
            ("g1.first", "conv", (160, 16, 3, 3), 1),
            ("g1", "conv", (160, 160, 3, 3), 7),
            ("g2.first", "conv", (320, 160, 3, 3), 1),
            ("g2", "conv", (320, 320, 3, 3), 7),
            ("g3.first", "conv", (640, 320, 3, 3), 1),
            ("g3", "conv", (640, 640, 3, 3), 7),
        ],
    },
}
SUITES.update(VARIANT_SUITES)
E2E = "e2e"
ALL_SUITES = [s for s in SUITES if s not in VARIANT_SUITES] + [E2E]
QUICK_SUITES = ["sngan_cnn", E2E]

IMPLS = ["torch_sn", "torch_legacy", "torch_compiled", "torch_bsn", "ref_bsn", "fused_sn", "fused_legacy", "fused_bsn"]
IMPL_TITLES = {
    "torch_sn": "torch SN",
    "torch_legacy": "legacy SN",
    "torch_compiled": "compiled SN",
    "torch_bsn": "torch BSN",
    "ref_bsn": "reference BSN",
    "fused_sn": "fused SN",
    "fused_legacy": "fused legacy SN",
    "fused_bsn": "fused BSN",
}
# Each variant against its peer formula in plain torch (bsn_cuda/benchmark/impls.py):
# soft bound (DUE's formula), learnable scale (sigmaReparam's), track-only (a
# logging power iteration as BigGAN's). Only on request (--impls).
VARIANT_IMPLS = ["peer_soft", "fused_soft", "peer_scale", "fused_scale", "peer_track", "fused_track"]
IMPLS += VARIANT_IMPLS
IMPL_TITLES.update({
    "peer_soft": "DUE soft bound (torch)",
    "fused_soft": "fused soft bound",
    "peer_scale": "sigmaReparam (torch)",
    "fused_scale": "fused learnable scale",
    "peer_track": "track-only (torch)",
    "fused_track": "fused track-only",
})
VARIANT_COMPARISONS = [
    ("soft_vs_peer", "peer_soft", "fused_soft", "fused soft bound vs DUE's formula"),
    ("scale_vs_peer", "peer_scale", "fused_scale", "fused learnable scale vs sigmaReparam's"),
    ("track_vs_peer", "peer_track", "fused_track", "fused track-only vs torch's"),
]
FUSED = ("fused_sn", "fused_legacy", "fused_bsn", "fused_soft", "fused_scale", "fused_track")
MODES = ["train", "eval", "fwd_bwd"]
# ref_bsn (bsn_cuda.reference's ops as a parametrization, with their bookkeeping:
# checks, state snapshot, accept rule) only on request; torch_bsn is the lean
# plain-PyTorch BSN a user would write and the baseline of the BSN speedup.
DEFAULT_IMPLS = [i for i in IMPLS if i != "ref_bsn" and i not in VARIANT_IMPLS]
# Compile cases are slow to set up (seconds each on a small CPU): not in --quick.
QUICK_IMPLS = [i for i in DEFAULT_IMPLS if i != "torch_compiled"]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Speedup columns: (key, numerator impl, denominator impl, title).
# speedup = time(numerator) / time(denominator); for "bsn_sn" it is a cost ratio.
COMPARISONS = [
    ("vs_torch_sn", "torch_sn", "fused_sn", "fused SN vs torch SN"),
    ("vs_legacy", "torch_legacy", "fused_sn", "fused SN vs legacy SN"),
    ("vs_compiled", "torch_compiled", "fused_sn", "fused SN vs compiled SN"),
    ("bsn_vs_torch_bsn", "torch_bsn", "fused_bsn", "fused BSN vs torch BSN"),
    ("legacy_vs_legacy", "torch_legacy", "fused_legacy", "fused legacy SN vs legacy SN"),
]
BSN_RATIO = ("bsn_sn", "fused_bsn", "fused_sn", "fused BSN / fused SN cost")

# Goals of the issue, judged on the 2-core CPU, sngan_cnn, float32.
GOALS = [
    # (id, text, suite, mode, metric key, op, threshold)
    ("fwd_bwd_3x", "SNGAN CNN training fwd+bwd: fused SN >= 3x torch parametrized SN",
     "sngan_cnn", "fwd_bwd", "vs_torch_sn", ">=", 3.0),
    ("fwd_bwd_5x", "SNGAN CNN training fwd+bwd: fused SN >= 5x torch parametrized SN (real goal)",
     "sngan_cnn", "fwd_bwd", "vs_torch_sn", ">=", 5.0),
    ("train_fwd_2x", "SNGAN CNN training forward: fused SN >= 2x torch parametrized SN",
     "sngan_cnn", "train", "vs_torch_sn", ">=", 2.0),
    ("bsn_train_1.3", "SNGAN CNN training forward: fused BSN <= 1.3x fused SN",
     "sngan_cnn", "train", "bsn_sn", "<=", 1.3),
    ("bsn_fwd_bwd_1.3", "SNGAN CNN training fwd+bwd: fused BSN <= 1.3x fused SN",
     "sngan_cnn", "fwd_bwd", "bsn_sn", "<=", 1.3),
    ("train_fwd_4x", "SNGAN CNN training forward: fused SN >= 4x torch parametrized SN",
     "sngan_cnn", "train", "vs_torch_sn", ">=", 4.0),
    ("bsn_train_1.2", "SNGAN CNN training forward: fused BSN <= 1.2x fused SN",
     "sngan_cnn", "train", "bsn_sn", "<=", 1.2),
    # The legacy flavour must gain at least what the parametrized one gains:
    # metric legacy_vs_legacy, threshold the same suite and mode's vs_torch_sn.
    ("legacy_train", "SNGAN CNN training forward: fused legacy SN vs legacy SN >= fused SN vs torch SN",
     "sngan_cnn", "train", "legacy_vs_legacy", ">=", "vs_torch_sn"),
    ("legacy_fwd_bwd", "SNGAN CNN training fwd+bwd: fused legacy SN vs legacy SN >= fused SN vs torch SN",
     "sngan_cnn", "fwd_bwd", "legacy_vs_legacy", ">=", "vs_torch_sn"),
]


def bsn_effective(shape):
    """BSN differs from SN only for >= 3-D weights whose trailing dims are not all 1."""
    return len(shape) >= 3 and any(k != 1 for k in shape[2:])


def merge_layers(layers):
    """Merge identical (kind, shape) entries: measured once, counted k times."""
    merged = {}
    for name, kind, shape, count in layers:
        key = (kind, tuple(shape))
        if key in merged:
            merged[key]["name"] += "," + name
            merged[key]["count"] += count
        else:
            merged[key] = {"name": name, "kind": kind, "shape": tuple(shape), "count": count}
    return list(merged.values())
