"""The exported model: a versioned header (architecture, seed, layer table) plus the packed mask.

Layout (all integers little-endian):
    b"PRISM\\x00" | u16 version | u32 header length | header (UTF-8 JSON) | packed mask | sha256
The sha256 covers every byte before it. The frozen weights are regenerated from the seed and the
BatchNorm statistics are recomputed from a seeded batch of noise, so the mask is the whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prismfl.bits import pack_mask, unpack_mask
from prismfl.errors import ModelFileError
from prismfl.files import atomic_write_bytes, read_capped
from prismfl.model import masked
from prismfl.model.generators import (
    MAX_WEIGHTS,
    ArchSpec,
    build_generator,
    calibrate_batchnorm,
    count_weights,
    layer_shapes,
)

MAGIC = b"PRISM\x00"
VERSION = 1
_PREFIX = struct.Struct("<6sHI")
BN_SAMPLES = 2048
MAX_HEADER_BYTES = 1 << 20  # a model file's JSON header (arch, layer table, provenance): a few kB in practice
# the largest model file: prefix, header, the mask of the largest network (MAX_WEIGHTS bits) and the sha256
MAX_MODEL_BYTES = _PREFIX.size + MAX_HEADER_BYTES + (MAX_WEIGHTS + 7) // 8 + 32


@dataclass
class PrismModel:
    spec: ArchSpec
    mask: torch.Tensor  # bool, one entry per maskable weight
    info: dict = field(default_factory=dict)  # provenance: dataset, rounds, privacy, ...
    class_shares: list[float] | None = None  # a conditional model's class shares (the default labels)

    def layers(self) -> list[tuple[str, tuple[int, ...]]]:
        return layer_shapes(self.spec)


def to_bytes(model: PrismModel) -> bytes:
    table = layer_shapes(model.spec)
    n = sum(math.prod(shape) for _, shape in table)
    if model.mask.numel() != n:
        raise ValueError(f"mask has {model.mask.numel()} entries, the architecture {n}")
    payload = pack_mask(model.mask)
    shares = check_class_shares(model.class_shares, model.spec.codes)
    header = {
        "format": "prismfl-model",
        "arch": model.spec.to_dict(),
        "num_weights": n,
        "layers": [[name, list(shape)] for name, shape in table],
        "mask_coding": "packed-bits-le",
        "payload_bytes": len(payload),
        "bn_calibration": {"seed": model.spec.weight_seed, "samples": BN_SAMPLES},
        "info": model.info,
    }
    if shares is not None:
        header["class_shares"] = shares
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def from_bytes(data: bytes, source: str = "model file") -> PrismModel:
    """Parse and check a model file; any defect is a ModelFileError naming what is wrong. Every field
    is checked, and the mask's size and the layer table against the architecture; no generator is built
    (materialize builds one), so the memory it takes is the mask's: N bytes as a bool tensor."""
    if len(data) < _PREFIX.size + 32:
        raise ModelFileError(f"{source} is not a prismfl model (too short: {len(data)} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ModelFileError(f"{source} is not a prismfl model (wrong magic bytes)")
    if version != VERSION:
        raise ModelFileError(f"{source} has format version {version}; this prismfl reads version {VERSION}")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise ModelFileError(f"{source} is corrupt or truncated (checksum mismatch)")
    if head_len > len(data) - _PREFIX.size - 32:
        raise ModelFileError(f"{source}: its header length runs past the end of the file")
    if head_len > MAX_HEADER_BYTES:
        raise ModelFileError(f"{source}: its header of {head_len:,} bytes is over prismfl's limit of "
                             f"{MAX_HEADER_BYTES:,}")  # fmt: skip
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + head_len])
        if not isinstance(header, dict) or not isinstance(header.get("arch"), dict):
            raise ValueError("the header is not a table with an 'arch' table")
        required, allowed = set(ArchSpec().to_dict()), set(ArchSpec().__dict__)
        if not required <= set(header["arch"]) <= allowed:
            raise ValueError(f"'arch' must have the keys {sorted(required)} (and num_classes, modes for a "
                             "conditional model)")  # fmt: skip
        spec = ArchSpec(**header["arch"]).validate()
        if "num_classes" in header["arch"] and not spec.num_classes:
            raise ValueError("num_classes is written only for a conditional model (> 0)")
        if "modes" in header["arch"] and spec.modes == 1:
            raise ValueError("modes is written only when a class has several (> 1)")
        shares = check_class_shares(header.get("class_shares"), spec.codes)
        n = header["num_weights"]
        if isinstance(n, bool) or not isinstance(n, int) or n != count_weights(spec):
            raise ValueError(f"num_weights {n!r} is not the {count_weights(spec):,} of architecture {spec.name!r}")
        if not isinstance(header.get("info", {}), dict):
            raise ValueError("'info' is not a table")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelFileError(f"{source} has an unreadable header: {str(exc)[:200]}") from None
    payload = data[_PREFIX.size + head_len : -32]
    if len(payload) != (n + 7) // 8:
        raise ModelFileError(f"{source}: a mask of {n:,} weights takes {(n + 7) // 8:,} bytes, the file has "
                             f"{len(payload):,}")  # fmt: skip
    if [[name, list(shape)] for name, shape in layer_shapes(spec)] != header.get("layers"):
        raise ModelFileError(f"{source}: its layer table does not match architecture {spec.name!r} in this prismfl")
    try:
        mask = unpack_mask(payload, n)
    except ValueError as exc:
        raise ModelFileError(f"{source}: {exc}") from None
    return PrismModel(spec, mask, header.get("info", {}), shares)


def check_class_shares(shares, num_classes: int) -> list[float] | None:
    """A conditional model's class shares: num_classes finite non-negative numbers summing to 1 (within
    1e-6); None for an unconditional model. A ValueError says what is wrong. With modes (ArchSpec.modes > 1)
    they are the shares of the condition codes: num_classes is spec.codes."""
    if not num_classes:
        if shares is not None:
            raise ValueError("class shares belong to a conditional model only")
        return None
    if not isinstance(shares, list) or len(shares) != num_classes:
        raise ValueError(f"a conditional model needs class_shares: a list of {num_classes} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
               for v in shares):  # fmt: skip
        raise ValueError("class_shares must be finite numbers >= 0")
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"class_shares must sum to 1, they sum to {sum(shares):.6g}")
    return [float(v) for v in shares]


def save(model: PrismModel, path: str | Path) -> int:
    """Write atomically; return the number of bytes."""
    from prismfl.files import atomic_write_bytes

    data = to_bytes(model)
    atomic_write_bytes(Path(path), data)
    return len(data)


def load(path: str | Path) -> PrismModel:
    path = Path(path)
    data = read_capped(path, MAX_MODEL_BYTES, "model file", ModelFileError)
    return from_bytes(data, str(path))


def materialize(model: PrismModel, device: str = "cpu") -> torch.nn.Module:
    """A ready-to-sample generator: frozen weights from the seed, the mask, recalibrated BatchNorm."""
    net = build_generator(model.spec)
    masked.set_fixed_mask(net, model.mask)
    calibrate_batchnorm(net, model.spec.weight_seed, n=BN_SAMPLES)
    if model.spec.num_classes:
        net.class_shares = torch.tensor(check_class_shares(model.class_shares, model.spec.codes))
    return net.to(device)


@torch.no_grad()
def sample(net: torch.nn.Module, n: int, seed: int = 0, batch: int = 500) -> torch.Tensor:
    """n images in [-1, 1] from seeded noise; the same seed gives the same images."""
    return sample_labelled(net, n, seed, batch=batch)[0]


def per_class_labels(num_classes: int, k: int) -> torch.Tensor:
    """k labels of each class in turn: 0 x k, 1 x k, ... (a grid with one row of k per class)."""
    return torch.arange(num_classes).repeat_interleave(k)


@torch.no_grad()
def sample_labelled(net: torch.nn.Module, n: int, seed: int = 0, labels: torch.Tensor | None = None,
                    batch: int = 500) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """n images in [-1, 1] and, for a conditional generator, their classes: `labels` when given (then n
    is len(labels)), else drawn from the model's class shares. The same seed, the same images and labels.
    With modes, the generator is given condition codes: drawn from the codes' shares (the classes returned
    are code // modes), or for given classes, each image's mode drawn from its class's mode shares."""
    gen = torch.Generator().manual_seed(seed)
    net.eval()
    conditional = getattr(net, "num_classes", 0) > 0
    if not conditional and labels is not None:
        raise ValueError("this model is not class-conditional: it cannot be asked for a class")
    if labels is not None:
        n = len(labels)
    codes = labels
    if conditional and labels is None:
        codes = torch.multinomial(net.class_shares.double(), n, replacement=True, generator=gen) if n else \
            torch.zeros(0, dtype=torch.long)  # fmt: skip
        labels = codes // net.modes
    elif labels is not None and net.modes > 1 and n:
        if not (0 <= int(labels.min()) and int(labels.max()) < net.num_classes):
            raise ValueError(f"class labels must be in 0..{net.num_classes - 1}")
        codes = labels.long() * net.modes + torch.multinomial(mode_shares(net)[labels.long()], 1, generator=gen)[:, 0]
    device = next(net.buffers()).device
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), net.z_dim, generator=gen).to(device)
        y = None if codes is None else codes[start : start + len(z)].to(device)
        out.append((net(z) if y is None else net(z, y)).cpu())
    return (torch.cat(out) if out else torch.empty(0)), labels


def mode_shares(net: torch.nn.Module) -> torch.Tensor:
    """(classes, modes): each class's mode shares, from the codes' shares (uniform for a class of share 0)."""
    shares = net.class_shares.double().reshape(net.num_classes, net.modes)
    total = shares.sum(1, keepdim=True)
    return torch.where(total > 0, shares / total.clamp_min(1e-300), torch.full_like(shares, 1.0 / net.modes))


# ---------------------------------------------------------------- the dense (FedAvg) model file

DENSE_KEY = "prismfl-dense"
# the largest dense model file: safetensors' u64 header length, its JSON header, MAX_WEIGHTS float32 weights
MAX_DENSE_BYTES = 8 + MAX_HEADER_BYTES + 4 * MAX_WEIGHTS


def save_dense(path: Path, spec: ArchSpec, weights: torch.Tensor, dataset: str) -> int:
    """The FedAvg baseline's model: float32 weights (safetensors) with the architecture in the metadata."""
    from safetensors.torch import save

    meta = {"arch": spec.to_dict(), "dataset": dataset, "method": "fedavg"}  # one key: the same bytes every time
    data = save({"weights": weights.detach().cpu().contiguous().float()}, metadata={DENSE_KEY: json.dumps(meta)})
    atomic_write_bytes(Path(path), data)
    return len(data)


def dense_generator(spec: ArchSpec, weights: torch.Tensor) -> torch.nn.Module:
    """A ready-to-sample dense generator, BatchNorm recalibrated the same way as a mask model's."""
    net = masked.make_dense(build_generator(spec), spec.weight_seed)
    masked.set_trainable(net, weights)
    calibrate_batchnorm(net, spec.weight_seed, n=BN_SAMPLES)
    return net


def load_dense(path: Path) -> tuple[torch.nn.Module, dict]:
    """The FedAvg model file as a generator, with its metadata; any defect is a ModelFileError."""
    from safetensors.torch import load

    data = read_capped(path, MAX_DENSE_BYTES, "model file", ModelFileError)
    try:
        from prismfl.safestate import read_header

        meta = json.loads(read_header(data, str(path))["__metadata__"][DENSE_KEY])
        spec = ArchSpec(**meta["arch"]).validate()
        weights = load(data)["weights"]
        if weights.shape != (count_weights(spec),):  # before the generator is built
            raise ValueError(f"weights of shape {tuple(weights.shape)}; architecture {spec.name!r} has "
                             f"{count_weights(spec):,}")  # fmt: skip
        net = dense_generator(spec, weights)
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON and a wrong shape raise several types
        raise ModelFileError(f"cannot read dense model {path}: {str(exc)[:200]}") from None
    return net, {"dataset": meta.get("dataset"), "method": meta.get("method"), "bytes": len(data)}
