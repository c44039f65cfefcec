"""Generator architectures built from masked layers (no biases, BatchNorm without affine terms)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from prismfl.model.masked import (
    MaskedConv2d,
    MaskedConvTranspose2d,
    MaskedLinear,
    init_frozen_weights,
)

ARCHITECTURES = ("resnet", "dcgan", "mlp", "mlp-up")
CONDITIONAL_ARCHITECTURES = ("mlp", "mlp-up")  # model.conditional: a class label beside z


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a generator bit for bit: stored in checkpoints and model files."""

    name: str = "dcgan"
    z_dim: int = 64
    width: int = 256
    channels: int = 1
    img_size: int = 28
    weight_seed: int = 0
    num_classes: int = 0  # > 0: a class-conditional generator (model.conditional)
    modes: int = 1  # > 1: each class's condition split into this many modes (model.modes; data/modes.py)

    @property
    def codes(self) -> int:
        """Condition codes the generator takes (class * modes + mode): num_classes x modes; 0 unconditional."""
        return self.num_classes * self.modes

    def to_dict(self) -> dict:
        """The fields, without num_classes for an unconditional model and modes when 1: older files keep
        the bytes they had."""
        d = dict(self.__dict__)
        if not self.num_classes:
            del d["num_classes"]
        if self.modes == 1:
            del d["modes"]
        return d

    def validate(self) -> ArchSpec:
        """Check every field's type and range, and the size of the network, before anything is built:
        a spec read from a file must not make prismfl allocate what it cannot (a ValueError says why)."""
        if not isinstance(self.name, str) or self.name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.name!r}; expected one of {ARCHITECTURES}")
        for key, low, high in (("z_dim", 1, MAX_Z_DIM), ("width", 1, MAX_WIDTH), ("channels", 1, 3),
                               ("img_size", 4, MAX_IMG_SIZE), ("weight_seed", 0, 2**63 - 1),
                               ("num_classes", 0, MAX_CLASSES), ("modes", 1, MAX_MODES)):  # fmt: skip
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{key} must be an integer in [{low}, {high:,}], got {value!r}")
        if self.num_classes and self.name not in CONDITIONAL_ARCHITECTURES:
            raise ValueError(f"a class-conditional generator is built for {' and '.join(CONDITIONAL_ARCHITECTURES)}, "
                             f"not {self.name!r}")  # fmt: skip
        if self.modes > 1 and not self.num_classes:
            raise ValueError("modes > 1 splits the classes of a class-conditional generator; this one has none")
        if self.channels == 2:
            raise ValueError("channels must be 1 (grey) or 3 (RGB), got 2")
        if self.name == "resnet" and self.img_size != 32:
            raise ValueError("the resnet generator makes 32x32 images; set data.resize = 32")
        if self.name == "mlp-up" and self.img_size % 2:
            raise ValueError(f"mlp-up needs an even image size, got {self.img_size}")
        if self.name == "dcgan" and self.img_size % 4:
            raise ValueError(f"dcgan needs an image size divisible by 4, got {self.img_size}")
        if count_weights(self) > MAX_WEIGHTS:
            raise ValueError(f"{count_weights(self):,} maskable weights is over prismfl's limit of {MAX_WEIGHTS:,}")
        return self


MAX_Z_DIM, MAX_WIDTH, MAX_IMG_SIZE, MAX_CLASSES, MAX_MODES = 4096, 4096, 256, 1000, 64
MAX_WEIGHTS = 50_000_000  # 14x the paper's ResNet; a generator above it needs several GB to build


def count_weights(spec: ArchSpec) -> int:
    """Maskable weights of the architecture, computed from the spec without building anything."""
    z, w, c, s = spec.z_dim + spec.codes, spec.width, spec.channels, spec.img_size
    if spec.name == "mlp":
        return z * w + w * 2 * w + 2 * w * c * s * s
    if spec.name == "mlp-up":
        return z * w + w * 2 * w + 2 * w * c * (s // 2) ** 2
    if spec.name == "dcgan":
        return z * 2 * w * (s // 4) ** 2 + 2 * w * w * 16 + w * c * 16
    blocks = sum(a * b * 9 + b * b * 9 + a * b for a, b in ((8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w)))
    return z * 8 * w * 16 + blocks + w * c * 9


def _bn2d(c: int) -> nn.BatchNorm2d:
    # Affine terms frozen at gamma=1, beta=0 (not part of the model); momentum=None gives
    # the exact population average when statistics are recalibrated for a fixed mask.
    return nn.BatchNorm2d(c, affine=False, momentum=None)


class ResUpBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus an upsampled 1x1-conv skip (the GFMN ResNet block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1, self.conv1 = _bn2d(cin), MaskedConv2d(cin, cout, 3, padding=1)
        self.bn2, self.conv2 = _bn2d(cout), MaskedConv2d(cout, cout, 3, padding=1)
        self.skip = MaskedConv2d(cin, cout, 1)

    def forward(self, x):
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    """The paper's generator: ConvT 4x4 z->8w, three up-blocks 8w->4w->2w->w, BN-ReLU-conv3-tanh.

    With z_dim=128, width=64, 32x32: 3,543,616 maskable weights for 1 channel, 3,544,768 for 3.
    """

    def __init__(self, spec: ArchSpec):
        super().__init__()
        if spec.img_size != 32:
            raise ValueError("the resnet generator makes 32x32 images; set data.resize = 32")
        w = spec.width
        self.z_dim = spec.z_dim
        self.stem = MaskedConvTranspose2d(spec.z_dim, 8 * w, 4)
        self.blocks = nn.Sequential(ResUpBlock(8 * w, 4 * w), ResUpBlock(4 * w, 2 * w), ResUpBlock(2 * w, w))
        self.bn = _bn2d(w)
        self.head = MaskedConv2d(w, spec.channels, 3, padding=1)

    def forward(self, z):
        h = self.blocks(self.stem(z.view(z.shape[0], -1, 1, 1)))
        return torch.tanh(self.head(F.relu(self.bn(h))))


class DCGANGenerator(nn.Module):
    """Linear z -> 2w x s/4 x s/4, then two 4x4 stride-2 transposed convs: cheap on a CPU."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        if spec.img_size % 4:
            raise ValueError(f"dcgan needs an image size divisible by 4, got {spec.img_size}")
        w, self.s0 = spec.width, spec.img_size // 4
        self.z_dim = spec.z_dim
        self.fc = MaskedLinear(spec.z_dim, 2 * w * self.s0 * self.s0)
        self.bn0 = nn.BatchNorm1d(2 * w * self.s0 * self.s0, affine=False, momentum=None)
        self.up1 = MaskedConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.bn1 = _bn2d(w)
        self.up2 = MaskedConvTranspose2d(w, spec.channels, 4, stride=2, padding=1)

    def forward(self, z):
        h = F.relu(self.bn0(self.fc(z))).view(z.shape[0], -1, self.s0, self.s0)
        return torch.tanh(self.up2(F.relu(self.bn1(self.up1(h)))))


class MLPGenerator(nn.Module):
    """z -> w -> 2w -> pixels, all fully connected.

    Class-conditional (spec.num_classes > 0): the input is z beside the one-hot condition code (the class,
    or with spec.modes > 1 the class's mode: class * modes + mode) scaled by
    sqrt(z_dim), so that the class moves the first layer as much as the noise does; and the hidden
    layers are normalised per sample (LayerNorm) instead of per batch, because a client's batches hold
    only its own classes: batch statistics would differ from client to client and from the sampler's.
    """

    def __init__(self, spec: ArchSpec):
        super().__init__()
        w = spec.width
        self.z_dim, self.num_classes, self.modes, self.codes = spec.z_dim, spec.num_classes, spec.modes, spec.codes
        self.shape = (spec.channels, spec.img_size, spec.img_size)
        self.fc1, self.bn1 = MaskedLinear(spec.z_dim + spec.codes, w), _norm1d(w, spec.num_classes)
        self.fc2, self.bn2 = MaskedLinear(w, 2 * w), _norm1d(2 * w, spec.num_classes)
        self.fc3 = MaskedLinear(2 * w, spec.channels * spec.img_size**2)

    def inputs(self, z, y=None):
        """z, with the scaled one-hot condition code y (the class, or class * modes + mode) beside it for a
        conditional generator."""
        if not self.num_classes:
            if y is not None:
                raise ValueError("this generator is not class-conditional: it takes no labels")
            return z
        if y is None or y.shape != (z.shape[0],):
            raise ValueError(f"a class-conditional generator needs one label per noise vector ({z.shape[0]})")
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < self.codes):
            what = "class labels" if self.modes == 1 else f"condition codes (class x {self.modes} + mode)"
            raise ValueError(f"{what} must be in 0..{self.codes - 1}")
        code = F.one_hot(y.long(), self.codes).to(z.dtype) * math.sqrt(self.z_dim)
        return torch.cat([z, code], 1)

    def pixels(self, z, y=None):
        """The output layer before the tanh, as images."""
        h = F.relu(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(self.inputs(z, y)))))))
        return self.fc3(h).view(z.shape[0], *self.shape)

    def forward(self, z, y=None):
        return torch.tanh(self.pixels(z, y))


def _norm1d(n: int, num_classes: int) -> nn.Module:
    if num_classes:
        return nn.LayerNorm(n, elementwise_affine=False)
    return nn.BatchNorm1d(n, affine=False, momentum=None)


class MLPUpGenerator(MLPGenerator):
    """The MLP at half resolution, upsampled bilinearly x2 before the tanh: a quarter of the output
    weights, and no pixel-level speckle (neighbouring pixels share their inputs)."""

    def __init__(self, spec: ArchSpec):
        super().__init__(replace(spec, name="mlp", img_size=spec.img_size // 2))
        self.size = spec.img_size

    def forward(self, z, y=None):
        up = F.interpolate(self.pixels(z, y), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.tanh(up)


_BUILDERS = {"resnet": ResNetGenerator, "dcgan": DCGANGenerator, "mlp": MLPGenerator, "mlp-up": MLPUpGenerator}


def layer_shapes(spec: ArchSpec) -> list[tuple[str, tuple[int, ...]]]:
    """The maskable layers' names and weight shapes (masked.layer_table of the generator), found without
    allocating or initialising a weight: the network is laid out on PyTorch's meta device."""
    from prismfl.model.masked import layer_table

    spec.validate()
    with torch.device("meta"):
        return layer_table(_BUILDERS[spec.name](spec))


def build_generator(spec: ArchSpec) -> nn.Module:
    """A generator with its frozen weights regenerated from spec.weight_seed; scores are zero."""
    spec.validate()
    model = _BUILDERS[spec.name](spec)
    init_frozen_weights(model, spec.weight_seed)
    return model


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, seed: int, n: int = 2048, batch: int = 256) -> None:
    """Recompute BatchNorm statistics for the model's current (fixed) mask from seeded noise.

    The model file stores only seed + mask; these statistics are derived, so every loader
    gets the same ones.
    """
    if not batchnorm_layers(model):  # a conditional generator normalises per sample: nothing to calibrate
        return
    gen = torch.Generator().manual_seed(seed)
    for bn in batchnorm_layers(model):
        bn.reset_running_stats()
    model.train()
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), model.z_dim, generator=gen)
        model(z)
    model.eval()
