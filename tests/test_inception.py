"""Inception weights loading: files in both formats written here from random networks, and wrong files.

Kept fast: one network per format, one or two images per forward (~0.25 s each at 299x299 on a CPU core).
"""

import hashlib

import numpy as np
import pytest
import torch

from prismfl.errors import ModelFileError
from prismfl.eval.inception import InceptionV3, inception_features, load_inception, protocol

FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
TV_NAME = "inception_v3_google-0cc3c7bd.pth"


def _random_net(variant, seed=0):
    torch.manual_seed(seed)
    net = InceptionV3(variant)
    for m in net.modules():  # He initialisation keeps activations O(1) through the 90-odd layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    return net.eval()


def _aux_head():
    """The auxiliary classifier tensors torchvision's file carries (unused for FID)."""
    out = {}
    for name, cin, cout, k in (("conv0", 768, 128, 1), ("conv1", 128, 768, 5)):
        out[f"AuxLogits.{name}.conv.weight"] = torch.randn(cout, cin, k, k) * 0.01
        for stat in ("weight", "bias", "running_mean", "running_var"):
            out[f"AuxLogits.{name}.bn.{stat}"] = torch.ones(cout)
    out["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    out["AuxLogits.fc.bias"] = torch.zeros(1000)
    return out


@pytest.fixture(scope="module")
def fid_state():
    net = _random_net("pytorch-fid")
    return net, net.state_dict()


@pytest.mark.parametrize("variant", ["pytorch-fid", "torchvision"])
def test_load_both_formats_and_extract(tmp_path, variant):
    src = _random_net(variant, seed=1)
    state = src.state_dict()
    if variant == "torchvision":  # like the real file: auxiliary head, no BN step counters
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")} | _aux_head()
    path = tmp_path / (FID_NAME if variant == "pytorch-fid" else TV_NAME)
    torch.save(state, path)

    net = load_inception(path)
    assert net.variant == variant and not net.training
    assert net.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert net.name_hash_matches is False  # random weights under the real file's name: flagged

    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    feats = inception_features(net, rgb, batch_size=2)  # two batches, the second partial
    assert feats.shape == (3, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert feats.std() > 0.01  # not collapsed to a constant
    expected = src.features(torch.from_numpy(rgb[2:]).float() / 127.5 - 1)
    assert np.allclose(feats[2:], expected.numpy(), rtol=1e-4, atol=1e-5)  # same weights, same numbers
    assert np.array_equal(inception_features(net, rgb[2:]), feats[2:])  # deterministic

    text = protocol(net, 10000, 10000, image_size=32)
    assert path.name in text and net.weights_sha256[:12] in text
    assert "299x299 bilinear" in text and "10,000 generated vs 10,000 real" in text
    assert "DOES NOT match the hash in its name" in text
    assert ("not the TF-FID network" in text) == (variant == "torchvision")


def test_greyscale_is_repeated_to_rgb(tmp_path, fid_state):
    net, _ = fid_state
    grey = torch.rand(1, 1, 28, 28) * 2 - 1
    assert torch.equal(net.features(grey), net.features(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="expected images"):
        net.features(torch.zeros(1, 2, 28, 28))


def test_name_hash_check_passes_for_an_honest_name(tmp_path, fid_state):
    _, state = fid_state
    tmp = tmp_path / "w.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    honest = tmp.rename(tmp_path / f"inception-{digest[:8]}.pth")
    net = load_inception(honest)
    assert net.name_hash_matches is True and "matches its name" in protocol(net, 5, 5)


def test_wrong_files_give_a_clear_error(tmp_path, fid_state):
    _, state = fid_state

    def load(obj_or_bytes, name="w.pth"):
        path = tmp_path / name
        if isinstance(obj_or_bytes, bytes):
            path.write_bytes(obj_or_bytes)
        else:
            torch.save(obj_or_bytes, path)
        return load_inception(path)

    with pytest.raises(ModelFileError, match="not found"):
        load_inception(tmp_path / "absent.pth")
    with pytest.raises(ModelFileError, match="garbage.pth is not a PyTorch state_dict.*pt_inception"):
        load(b"\x00\x01 definitely not torch" * 10, "garbage.pth")
    with pytest.raises(ModelFileError, match="not a PyTorch state_dict"):  # a whole pickled module is refused
        load(torch.nn.Linear(2, 2))
    with pytest.raises(ModelFileError, match="holds a list"):
        load([torch.zeros(1)])
    with pytest.raises(ModelFileError, match="not an Inception-v3 state_dict"):
        load(torch.nn.Linear(2, 2).state_dict())
    missing = {k: v for k, v in state.items() if not k.startswith("Mixed_6c.branch7x7_2.")}
    with pytest.raises(ModelFileError, match=r"is missing 5 Inception-v3 \(pytorch-fid\) tensors, e.g. Mixed_6c"):
        load(missing)
    with pytest.raises(ModelFileError, match="has unknown 1 .* extra.weight"):
        load(state | {"extra.weight": torch.zeros(1)})
    shaped = state | {"Mixed_5b.branch1x1.conv.weight": torch.zeros(64, 192, 3, 3)}
    with pytest.raises(ModelFileError, match="wrongly shaped 1 .* Mixed_5b.branch1x1.conv.weight"):
        load(shaped)
    with pytest.raises(ModelFileError, match="10-way classifier"):
        load(state | {"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)})
    # a DataParallel-style prefix and a {"state_dict": ...} wrapper are unwrapped
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    assert load(wrapped).variant == "pytorch-fid"
