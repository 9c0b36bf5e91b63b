"""SNGAN "CNN" discriminator and generator (Miyato et al., 2018, table 3) with a choice of normalization.

Discriminator: conv3x3 w, conv4x4/2 w, conv3x3 2w, conv4x4/2 2w, conv3x3 4w,
conv4x4/2 4w, conv3x3 8w, linear; LeakyReLU(0.1). With w = 64 and 32x32x3
inputs this is the CIFAR-10 model of the SNGAN and BSN papers; smaller ``w``
and image sizes (a multiple of 8) keep the same topology.

Normalizations (``norm``): ``none``, ``sn`` (bsn_cuda.spectral_norm, SSN when
``scale != 1``), ``strict`` (bsn_cuda.conv_spectral_norm on the convolutions,
for the input size each one sees; SN on the linear layer), ``bsn``
(bsn_cuda.bidirectional_spectral_norm, BSSN when ``scale != 1``; the linear
layer gets SN, since sigma(W) = sigma(W^T) there). ``ssn`` and ``bssn`` are
``sn`` and ``bsn`` with a default scale of 1.4.
"""

import math

import torch
from torch import nn

import bsn_cuda

NORMS = ("none", "sn", "ssn", "strict", "bsn", "bssn")
DEFAULT_SCALE = {"none": 1.0, "sn": 1.0, "ssn": 1.4, "strict": 1.0, "bsn": 1.0, "bssn": 1.4}
LEAKY_SLOPE = 0.1

# (kernel, stride, channel multiplier) of the 7 convolutions.
_D_CONVS = [(3, 1, 1), (4, 2, 1), (3, 1, 2), (4, 2, 2), (3, 1, 4), (4, 2, 4), (3, 1, 8)]


def init_weights(module, init="lecun", slope=LEAKY_SLOPE):
    """Normal init with std gain / sqrt(fan_in): gain 1 (LeCun) or sqrt(2 / (1 + slope^2)) (Kaiming
    for LeakyReLU); zero biases. ConvTranspose fan-in is c_in * k / stride^d (inputs per output)."""
    gain = {"lecun": 1.0, "kaiming": math.sqrt(2.0 / (1.0 + slope**2))}[init]
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
        elif isinstance(m, nn.ConvTranspose2d):
            fan_in = m.weight.shape[0] * m.weight[0, 0].numel() / (m.stride[0] * m.stride[1])
        else:
            continue
        with torch.no_grad():
            m.weight.normal_(0.0, gain / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.zero_()


class Discriminator(nn.Module):
    def __init__(self, in_channels=3, size=32, width=64, norm="sn", scale=None, init="lecun"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"Discriminator: expected norm in {NORMS}, got {norm!r}")
        if size % 8:
            raise ValueError(f"Discriminator: expected an image size that is a multiple of 8, got {size}")
        self.norm = norm
        self.scale = DEFAULT_SCALE[norm] if scale is None else float(scale)
        layers, shapes = [], []
        c, s = in_channels, size
        for k, stride, mult in _D_CONVS:
            conv = nn.Conv2d(c, width * mult, k, stride=stride, padding=1)
            layers += [conv, nn.LeakyReLU(LEAKY_SLOPE)]
            shapes.append((c, s, s))
            c, s = width * mult, s // stride
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c * s * s, 1)
        init_weights(self, init)
        self.convs = [m for m in self.body if isinstance(m, nn.Conv2d)]
        for conv, shape in zip(self.convs, shapes):
            _normalize(conv, norm, self.scale, shape)
        _normalize(self.fc, "sn" if norm in ("strict", "bsn", "bssn") else norm, self.scale, None)

    def layers(self):
        return self.convs + [self.fc]

    def forward(self, x):
        return self.fc(self.body(x).flatten(1)).squeeze(1)


def _normalize(module, norm, scale, input_shape):
    if norm == "none":
        return
    if norm in ("sn", "ssn"):
        bsn_cuda.spectral_norm(module, scale=scale)
    elif norm in ("bsn", "bssn"):
        bsn_cuda.bidirectional_spectral_norm(module, scale=scale)
    elif norm == "strict":
        bsn_cuda.conv_spectral_norm(module, input_shape, scale=scale)


def layer_sigma(module):
    """The sigma the layer's normalization divided by in its last forward (nan without one)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return float("nan")
    from bsn_cuda.nn.conv_sn import ConvSpectralNorm, get_conv_sigma

    if isinstance(module.parametrizations.weight[0], ConvSpectralNorm):
        return get_conv_sigma(module).item()
    return bsn_cuda.get_sigma(module).item()


class Generator(nn.Module):
    """z -> linear to (8w, s/8, s/8) -> 3 x [ConvT 4x4/2, BN, ReLU] -> conv3x3 -> tanh (SNGAN's CNN G)."""

    def __init__(self, z_dim=128, out_channels=3, size=32, width=64):
        super().__init__()
        self.z_dim = z_dim
        self.s0 = size // 8
        self.c0 = width * 8
        self.fc = nn.Linear(z_dim, self.c0 * self.s0 * self.s0)
        blocks = []
        c = self.c0
        for mult in (4, 2, 1):
            blocks += [nn.BatchNorm2d(c), nn.ReLU(), nn.ConvTranspose2d(c, width * mult, 4, 2, 1)]
            c = width * mult
        blocks += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out_channels, 3, 1, 1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)

    def forward(self, z):
        return self.body(self.fc(z).view(-1, self.c0, self.s0, self.s0))
