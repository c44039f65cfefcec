import math

import pytest
import torch

from prismfl import modelfile
from prismfl.errors import ModelFileError
from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator

SPEC = ArchSpec("dcgan", 8, 8, 1, 28, weight_seed=5)


def _model() -> modelfile.PrismModel:
    n = masked.num_maskable(build_generator(SPEC))
    mask = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5
    return modelfile.PrismModel(SPEC, mask, {"dataset": "fashion-mnist"})


def test_round_trip_and_size(tmp_path):
    m = _model()
    n = m.mask.numel()
    size = modelfile.save(m, tmp_path / "m.prism")
    data = (tmp_path / "m.prism").read_bytes()
    assert size == len(data)
    assert data[:6] == b"PRISM\x00" and int.from_bytes(data[6:8], "little") == modelfile.VERSION
    head_len = int.from_bytes(data[8:12], "little")
    assert len(data) == 12 + head_len + math.ceil(n / 8) + 32  # header + packed mask + sha256
    assert head_len < 2048
    back = modelfile.load(tmp_path / "m.prism")
    assert back.spec == SPEC and torch.equal(back.mask, m.mask) and back.info == m.info


def test_sampling_is_reproducible_bit_for_bit(tmp_path):
    m = _model()
    modelfile.save(m, tmp_path / "m.prism")
    a = modelfile.sample(modelfile.materialize(m), 16, seed=3)
    b = modelfile.sample(modelfile.materialize(modelfile.load(tmp_path / "m.prism")), 16, seed=3)
    c = modelfile.sample(modelfile.materialize(m), 16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda d: b"XRISM\x00" + d[6:], "wrong magic"),
        (lambda d: d[:6] + (99).to_bytes(2, "little") + d[8:], "format version 99"),
        (lambda d: d[:-40], "checksum mismatch"),
        (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum mismatch"),
        (lambda d: d[:10], "too short"),
        (lambda d: b"", "too short"),
    ],
)
def test_corrupt_files_are_rejected(tmp_path, mutate, msg):
    modelfile.save(_model(), tmp_path / "m.prism")
    bad = tmp_path / "bad.prism"
    bad.write_bytes(mutate((tmp_path / "m.prism").read_bytes()))
    with pytest.raises(ModelFileError, match=msg):
        modelfile.load(bad)


def test_layer_table_mismatch_is_rejected():
    import hashlib
    import json

    data = modelfile.to_bytes(_model())
    head_len = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + head_len])
    header["layers"][0][1] = [1, 2, 3]
    head = json.dumps(header).encode()
    body = data[:8] + len(head).to_bytes(4, "little") + head + data[12 + head_len : -32]
    with pytest.raises(ModelFileError, match="layer table"):
        modelfile.from_bytes(body + hashlib.sha256(body).digest())


def test_missing_file():
    with pytest.raises(ModelFileError, match="not found"):
        modelfile.load("/nonexistent/model.prism")
