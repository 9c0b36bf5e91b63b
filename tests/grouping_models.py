"""Small GAN models with many SN layers, for the grouping tests (tests/*/test_grouping*.py).

Each builder seeds torch and returns ``(model, inputs)``; ``model(*inputs)``
is a scalar-producing forward. Widths are small so that a test step takes
milliseconds; the layer kinds, counts and flavours follow the real models.
"""

import torch
import torch.nn.functional as F
from torch import nn

import bsn_cuda

SN = bsn_cuda.spectral_norm
LEGACY = bsn_cuda.nn.utils.spectral_norm
BSN = bsn_cuda.bidirectional_spectral_norm


class SNGANCNN(nn.Module):
    """SNGAN's CNN discriminator (Miyato et al., 2018): 7 convs and a linear, width ``c``."""

    def __init__(self, c=8):
        super().__init__()
        cfg = [(3, c, 3, 1), (c, c, 4, 2), (c, 2 * c, 3, 1), (2 * c, 2 * c, 4, 2), (2 * c, 4 * c, 3, 1),
               (4 * c, 4 * c, 4, 2), (4 * c, 8 * c, 3, 1)]
        self.convs = nn.ModuleList(SN(nn.Conv2d(i, o, k, s, 1)) for i, o, k, s in cfg)
        self.fc = SN(nn.Linear(8 * c * 4 * 4, 1))

    def forward(self, x):
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return self.fc(x.flatten(1)).sum()


class ResBlockD(nn.Module):
    def __init__(self, cin, cout, norm, down=True):
        super().__init__()
        self.c1, self.c2 = norm(nn.Conv2d(cin, cout, 3, 1, 1)), norm(nn.Conv2d(cout, cout, 3, 1, 1))
        self.sc = norm(nn.Conv2d(cin, cout, 1))
        self.down = down

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = self.sc(x)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class SNGANResNet(nn.Module):
    """SNGAN's ResNet discriminator: 4 blocks (3 SN convs each) and a linear, width ``c``."""

    def __init__(self, c=8, norm=SN):
        super().__init__()
        self.blocks = nn.Sequential(ResBlockD(3, c, norm), ResBlockD(c, c, norm), ResBlockD(c, c, norm, False),
                                    ResBlockD(c, c, norm, False))
        self.fc = norm(nn.Linear(c, 1))

    def forward(self, x):
        return self.fc(F.relu(self.blocks(x)).sum((2, 3))).sum()


class BigGAND(nn.Module):
    """BigGAN's discriminator shape: residual blocks, a linear head and a projection embedding (SN)."""

    def __init__(self, c=8, classes=5, blocks=5):
        super().__init__()
        chans = [3] + [c] * blocks
        self.blocks = nn.Sequential(*(ResBlockD(chans[i], chans[i + 1], SN, i < 3) for i in range(blocks)))
        self.fc = SN(nn.Linear(c, 1))
        self.embed = SN(nn.Embedding(classes, c))

    def forward(self, x, y):
        h = F.relu(self.blocks(x)).sum((2, 3))
        return (self.fc(h).squeeze(1) + (self.embed(y) * h).sum(1)).sum()


class CondBN(nn.Module):
    """BigGAN's class-conditional batch norm: gain and bias from SN linears of the shared embedding."""

    def __init__(self, emb, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.gain, self.bias = SN(nn.Linear(emb, c, bias=False)), SN(nn.Linear(emb, c, bias=False))

    def forward(self, x, e):
        return self.bn(x) * (1 + self.gain(e)[:, :, None, None]) + self.bias(e)[:, :, None, None]


class BigGANG(nn.Module):
    """BigGAN's generator shape: an SN linear from z, blocks of two SN convs, a 1x1 SN shortcut and two
    conditional BNs (four SN Linear(emb, C)), and an SN output conv."""

    def __init__(self, c=8, z=12, emb=10, classes=5, blocks=3):
        super().__init__()
        self.c = c
        self.shared = nn.Embedding(classes, emb)
        self.fc = SN(nn.Linear(z + emb, 4 * 4 * c))
        self.bn1 = nn.ModuleList(CondBN(z + emb, c) for _ in range(blocks))
        self.bn2 = nn.ModuleList(CondBN(z + emb, c) for _ in range(blocks))
        self.c1 = nn.ModuleList(SN(nn.Conv2d(c, c, 3, 1, 1)) for _ in range(blocks))
        self.c2 = nn.ModuleList(SN(nn.Conv2d(c, c, 3, 1, 1)) for _ in range(blocks))
        self.sc = nn.ModuleList(SN(nn.Conv2d(c, c, 1)) for _ in range(blocks))
        self.out = SN(nn.Conv2d(c, 3, 3, 1, 1))

    def forward(self, z, y):
        e = torch.cat([z, self.shared(y)], 1)
        h = self.fc(e).view(-1, self.c, 4, 4)
        for bn1, bn2, c1, c2, sc in zip(self.bn1, self.bn2, self.c1, self.c2, self.sc):
            x = F.interpolate(h, scale_factor=2)
            h = c2(F.relu(bn2(c1(F.relu(bn1(x, e))), e))) + sc(x)
        return torch.tanh(self.out(F.relu(h))).square().sum()


class ConditionalD(nn.Module):
    """A conditional (projection) discriminator with SN on the class embedding (legacy flavour on it)."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.c1 = SN(nn.Conv2d(3, c, 3, 2, 1))
        self.c2 = SN(nn.Conv2d(c, c, 3, 2, 1))
        self.fc = SN(nn.Linear(c, 1))
        self.embed = LEGACY(nn.Embedding(classes, c))

    def forward(self, x, y):
        h = F.relu(self.c2(F.relu(self.c1(x)))).sum((2, 3))
        return (self.fc(h).squeeze(1) + (self.embed(y) * h).sum(1)).sum()


class MixedFlavours(nn.Module):
    """Both flavours, BSN, dims 0 and 1 (ConvTranspose), scales, 2 power iterations, float64 and float16
    layers, each layer applied to its own input."""

    def __init__(self):
        super().__init__()
        self.a = SN(nn.Conv2d(3, 6, 3), n_power_iterations=2, scale=1.5)
        self.b = BSN(nn.Conv2d(6, 4, 3))
        self.c = LEGACY(nn.Conv2d(4, 5, 3))
        self.d = SN(nn.ConvTranspose2d(4, 3, 3))  # dim 1
        self.e = LEGACY(nn.ConvTranspose2d(3, 2, 3))  # legacy dim 1: per layer in training
        self.f = BSN(nn.Linear(7, 9), scale=0.5)  # BSN's single-matricization path
        self.g = LEGACY(nn.Linear(9, 3), n_power_iterations=3)
        self.h = SN(nn.Linear(5, 4).double())
        self.i = BSN(nn.Conv1d(4, 6, 3).double())
        self.j = SN(nn.Linear(6, 6))
        self.j.to(torch.bfloat16)

    def forward(self, x):
        x = x.float()
        out = self.b(self.a(x)).sum() + self.c(torch.ones(1, 4, 5, 5)).sum()
        out = out + self.e(self.d(torch.ones(1, 4, 3, 3))).sum() + self.g(self.f(torch.ones(1, 7))).sum()
        out = out + self.h(torch.ones(1, 5, dtype=torch.float64)).sum().float()
        out = out + self.i(torch.ones(1, 4, 5, dtype=torch.float64)).sum().float()
        return out + self.j(torch.ones(1, 6, dtype=torch.bfloat16)).float().sum()


def build(name, seed=0):
    """``(model, inputs)`` of a named model, seeded."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, 5, (3,), generator=gen)
    if name == "sngan_cnn":
        return SNGANCNN(), (torch.randn(3, 3, 32, 32, generator=gen),)
    if name == "sngan_resnet":
        return SNGANResNet(), (torch.randn(3, 3, 16, 16, generator=gen),)
    if name == "sngan_resnet_bsn":
        return SNGANResNet(norm=BSN), (torch.randn(3, 3, 16, 16, generator=gen),)
    if name == "biggan_d":
        return BigGAND(), (torch.randn(3, 3, 32, 32, generator=gen), y)
    if name == "biggan_g":
        return BigGANG(), (torch.randn(3, 12, generator=gen), y)
    if name == "conditional_d":
        return ConditionalD(), (torch.randn(3, 3, 8, 8, generator=gen), y)
    if name == "mixed":
        return MixedFlavours(), (torch.randn(1, 3, 7, 7, generator=gen),)
    raise ValueError(name)


MODELS = ["sngan_cnn", "sngan_resnet", "sngan_resnet_bsn", "biggan_d", "biggan_g", "conditional_d", "mixed"]
