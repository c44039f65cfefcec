"""Feature networks for the matching loss. Each maps images in [-1, 1] to a list of (B, D) features.

- `public`: a small CNN that prismfl trains on public data that no client holds (see public.py).
- `random`: the same CNN with seeded random weights (no data at all).
- `vgg19bn`: torchvision's VGG19-BN loaded from a state_dict file the user supplies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prismfl.errors import ConfigError, ModelFileError

FEATURE_NETS = ("public", "random", "vgg19bn")


class SmallCNN(nn.Module):
    """Three conv stages (widths w, 2w, 4w), each conv-ReLU-conv-ReLU-pool; all ReLUs are features."""

    def __init__(self, channels: int = 1, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.class_probs = False  # loss.class_term: the head's class probabilities are one more feature layer
        self.pool = 1  # loss.pool: spatial maps are average-pooled by this factor before they are features
        ws = [width, 2 * width, 4 * width]
        layers, cin = [], channels
        for w in ws:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):  # classification logits, used when training on public data
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def _flat(self, x):
        """A feature map as features: average-pooled by `pool` (fewer, smoother dimensions) and flattened."""
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool, ceil_mode=True)
        return x.flatten(1)

    def extract(self, x) -> list[torch.Tensor]:
        out = [self._flat(x)]  # pixels are features too: they anchor brightness and layout
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                out.append(self._flat(x))
        if self.class_probs:  # their mean is the batch's class shares: matching it holds every class
            out.append(self.classifier(x.mean(dim=(2, 3))).softmax(1))
        return out


# torchvision's VGG19-BN ("E"): numbers are conv widths, "M" a max-pool
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19BNFeatures(nn.Module):
    """torchvision's vgg19_bn `features` with the same parameter names, and all 16 ReLUs as features."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def extract(self, x) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                out.append(x.flatten(1))
        return out


def load_vgg19bn(path: str | Path) -> VGG19BNFeatures:
    """Load torchvision's vgg19_bn state_dict (classifier keys are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"loss.vgg_weights: {path} does not exist; supply torchvision's vgg19_bn state_dict "
            "(vgg19_bn-c79401a0.pth), nothing is downloaded"
        )
    import io

    from prismfl.files import MAX_NET_WEIGHTS_BYTES, read_capped

    data = read_capped(path, MAX_NET_WEIGHTS_BYTES, "VGG weights", ModelFileError)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ModelFileError(f"cannot read VGG weights {path}: {str(exc)[:200]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = VGG19BNFeatures()
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = set(net.features.state_dict(prefix="features.")) - set(feats)
    if missing:
        raise ModelFileError(f"{path} is not a vgg19_bn state_dict: missing {sorted(missing)[:3]}...")
    try:
        net.load_state_dict(feats, strict=False)
    except RuntimeError as exc:
        raise ModelFileError(f"{path} does not fit vgg19_bn: {str(exc).splitlines()[-1].strip()}") from None
    return net.eval()


def seeded_cnn(channels: int, width: int, num_classes: int, seed: int) -> SmallCNN:
    """SmallCNN with PyTorch's default init drawn under `seed`; the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(channels, width, num_classes)


def random_cnn(channels: int, width: int, seed: int) -> SmallCNN:
    """The seeded SmallCNN, untrained, in eval mode: loss.features = "random"."""
    return seeded_cnn(channels, width, 10, seed).eval()


def freeze(net: nn.Module) -> nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
