"""Inception-v3 pool3 features for FID, from a weights file the user supplies (nothing is downloaded).

Two files are understood, told apart by their keys:

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: the TensorFlow FID graph ported to PyTorch,
  1008-way classifier, no auxiliary head. Its Inception blocks pool differently from the standard
  network: the average pools of the 35x35, 17x17 and first 8x8 blocks leave the zero padding out of
  the mean, and the last 8x8 block (Mixed_7c) takes a max pool in that branch. This is the variant
  behind published FID numbers.
* torchvision's ``inception_v3_google-*.pth``: the ImageNet classifier (1000 classes, auxiliary head,
  zero-padded average pools). The PRISM authors' FID used these weights; numbers differ from TF-FID.

Both take RGB in [-1, 1] (torchvision's ``transform_input`` maps ImageNet-normalised input to exactly
this range), resized to 299x299 with bilinear interpolation; greyscale is repeated to three channels.
Features are the 2048-d global average of the last block (pool3).

The network is written here from the published architecture (Szegedy et al., "Rethinking the
Inception Architecture", 2016) with module names that match the two files' keys.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prismfl.errors import ModelFileError

INPUT_SIZE = 299
FEATURES = 2048
VARIANTS = {
    "pytorch-fid": "pytorch-fid's port of the TensorFlow FID Inception (the standard FID network)",
    "torchvision": "torchvision's ImageNet Inception-v3 (not the TF-FID network; numbers differ from standard FID)",
}
_CLASSES = {"pytorch-fid": 1008, "torchvision": 1000}


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x, pool: str):
    """The 3x3 stride-1 pool before a block's pooling branch: 'avg' (zeros counted), 'avg-valid'
    (zeros left out of the mean) or 'max'."""
    if pool == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=pool == "avg")


class Block35(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_channels, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_pool_branch(x, self.pool)),
            ],
            1,
        )


class Reduce35(nn.Module):
    """35x35 -> 17x17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class Block17(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, cin: int, mid: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, mid, 1)
        self.branch7x7_2 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(mid, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(mid, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(dbl))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                dbl,
                self.branch_pool(_pool_branch(x, self.pool)),
            ],
            1,
        )


class Reduce17(nn.Module):
    """17x17 -> 8x8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class Block8(nn.Module):
    """8x8 block (Mixed_7b-c) with the 3x3 convolutions split into parallel 1x3 and 3x1."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(_pool_branch(x, self.pool)),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """Inception-v3 up to pool3, plus the classifier layer the weights files carry (unused for FID).

    variant 'pytorch-fid' or 'torchvision' selects the pooling of the blocks and the classifier width.
    """

    def __init__(self, variant: str = "pytorch-fid"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Inception variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self.variant = variant
        fid = variant == "pytorch-fid"
        pool = "avg-valid" if fid else "avg"
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Block35(192, 32, pool)
        self.Mixed_5c = Block35(256, 64, pool)
        self.Mixed_5d = Block35(288, 64, pool)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b = Block17(768, 128, pool)
        self.Mixed_6c = Block17(768, 160, pool)
        self.Mixed_6d = Block17(768, 160, pool)
        self.Mixed_6e = Block17(768, 192, pool)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b = Block8(1280, pool)
        self.Mixed_7c = Block8(2048, "max" if fid else "avg")
        self.fc = nn.Linear(FEATURES, _CLASSES[variant])
        # Set by load_inception: what the weights are, for the protocol line.
        self.weights_name = "(random initialisation)"
        self.weights_sha256 = ""
        self.name_hash_matches: bool | None = None

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1], C = 1 or 3, any size -> pool3 features (N, 2048)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
        param = self.fc.weight
        x = images.to(device=param.device, dtype=param.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        was_training = self.training
        self.eval()
        try:
            return self.pool3(x)
        finally:
            self.train(was_training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def _read_state_dict(path: Path) -> tuple[dict, str]:
    """The weights file's state_dict and its sha256."""
    import io

    from prismfl.files import MAX_NET_WEIGHTS_BYTES, read_capped

    data = read_capped(path, MAX_NET_WEIGHTS_BYTES, "Inception weights", ModelFileError)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a weights file"
        why = (str(exc).splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path} is not a PyTorch state_dict ({type(exc).__name__}: {why}); {_WANTED}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; {_WANTED}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj, hashlib.sha256(data).hexdigest()


_WANTED = "expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torchvision's inception_v3_google-*.pth"


def detect_variant(state: dict, path: Path | str = "weights") -> str:
    """'pytorch-fid' or 'torchvision' from the keys (auxiliary head) and the classifier width."""
    fc = state.get("fc.weight")
    if "Mixed_7c.branch_pool.conv.weight" not in state or fc is None or fc.ndim != 2:
        raise ModelFileError(
            f"{path} is not an Inception-v3 state_dict (no Mixed_7c/fc weights; {len(state)} keys such as "
            f"{', '.join(list(state)[:3])}); {_WANTED}"
        )
    has_aux = any(k.startswith("AuxLogits.") for k in state)
    if fc.shape[0] == _CLASSES["pytorch-fid"] and not has_aux:
        return "pytorch-fid"
    if fc.shape[0] == _CLASSES["torchvision"]:
        return "torchvision"
    raise ModelFileError(
        f"{path} is an Inception-v3 with a {fc.shape[0]}-way classifier"
        f"{' and an auxiliary head' if has_aux else ''}, neither of the two known FID weights; {_WANTED}"
    )


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionV3:
    """The network for a weights file, in eval mode; any other file is a ModelFileError saying why."""
    path = Path(path).expanduser()
    state, sha256 = _read_state_dict(path)
    variant = detect_variant(state, path)
    net = InceptionV3(variant)
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # the auxiliary head is unused
    # Older files carry no BN step counters; the counters never influence eval-mode outputs.
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    for what, keys in (("is missing", missing), ("has unknown", unexpected), ("has wrongly shaped", wrong)):
        if keys:
            raise ModelFileError(
                f"{path} {what} {len(keys)} Inception-v3 ({variant}) tensors, e.g. {', '.join(keys[:3])}; "
                f"the file is damaged or a different network; {_WANTED}"
            )
    net.load_state_dict({**{k: own[k] for k in optional}, **state})
    net.weights_name = path.name
    net.weights_sha256 = sha256
    stated = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", path.name)  # torch hub names carry a sha256 prefix
    net.name_hash_matches = None if stated is None else net.weights_sha256.startswith(stated.group(1))
    return net.to(device).eval()


@torch.no_grad()
def inception_features(
    net: InceptionV3, images, batch_size: int = 50, device: str | torch.device | None = None, desc: str = "Inception"
) -> np.ndarray:
    """pool3 features (N, 2048) float64 of uint8 arrays (N, C, H, W) or float tensors in [-1, 1]."""
    from prismfl.progress import bar

    if device is not None:
        net = net.to(device)
    n = len(images)
    out = np.empty((n, FEATURES))
    for start in bar(range(0, n, batch_size), desc=desc, unit="batch"):
        batch = images[start : start + batch_size]
        if isinstance(batch, np.ndarray):
            if batch.dtype != np.uint8:
                raise ValueError(f"numpy images must be uint8 in [0, 255], got {batch.dtype}")
            batch = torch.from_numpy(batch).float().div_(127.5).sub_(1.0)
        out[start : start + len(batch)] = net.features(batch).double().cpu().numpy()
    return out


def protocol(net: InceptionV3, n_generated: int, n_real: int, image_size: int | None = None) -> str:
    """One line naming everything an Inception FID depends on, to print beside the number."""
    sha = net.weights_sha256[:12] or "none"
    check = {True: ", matches its name", False: ", DOES NOT match the hash in its name", None: ""}
    size = f"{image_size}x{image_size} " if image_size else ""
    return (
        f"Inception FID with {VARIANTS[net.variant]}; weights {net.weights_name} (sha256 {sha}"
        f"{check[net.name_hash_matches]}); pool3 2048-d features; images {size}in [-1, 1] resized to "
        f"{INPUT_SIZE}x{INPUT_SIZE} bilinear, greyscale repeated to RGB; "
        f"{n_generated:,} generated vs {n_real:,} real images"
    )


def inception_fid(weights: str | Path, images: torch.Tensor, dataset: str, root: str | None = None,
                  n_real: int = 10000) -> tuple[float, str]:  # fmt: skip
    """Inception FID of generated `images` against up to n_real test images, with its protocol line.

    The real images' features are cached (keyed by the weights' sha256, the dataset and n_real):
    on a CPU, 10,000 images through Inception take about a quarter of an hour.
    """
    from prismfl.cache import cached_state_dict
    from prismfl.data.sources import load_split
    from prismfl.eval.metrics import fid_from_features

    net = load_inception(weights)
    test = load_split(dataset, "test", root)
    n = min(n_real, len(test))
    spec = {"kind": "inception-reference", "weights_sha256": net.weights_sha256, "dataset": dataset,
            "source": test.source, "n": n}  # fmt: skip

    def build():
        feats = inception_features(net, test.images[:n], desc="Inception, real images")
        return {"features": torch.from_numpy(feats)}, {"images": n}

    real = cached_state_dict("inception-ref", spec, build)[0]["features"].numpy()
    fake = inception_features(net, images, desc="Inception, generated images")
    return fid_from_features(fake, real), protocol(net, len(images), n, images.shape[-1])
