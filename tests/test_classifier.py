"""The evaluation classifier: FashionMNIST's pinned weights, and the trained-and-cached path of the rest."""

import dataclasses
import hashlib

import pytest
import torch

from conftest import needs_fmnist
from prismfl.eval import classifier
from prismfl.eval.classifier import CLASSIFIER, PROTOCOL, SHIPPED, EvalCNN, domain_classifier
from prismfl.shipped import WEIGHTS, WeightsError, load_shipped

FMNIST = SHIPPED[("fashion-mnist", 28)]


def _no_training(message):
    raise AssertionError(f"trained instead of loading the shipped weights: {message}")


def test_the_shipped_weights_are_the_pinned_file():
    data = (WEIGHTS / FMNIST.file).read_bytes()
    assert hashlib.sha256(data).hexdigest() == FMNIST.sha256 and PROTOCOL == "prismfl-domain-v3"


@needs_fmnist
def test_fashion_mnist_loads_the_shipped_classifier_and_it_scores_its_accuracy_on_the_real_test_set():
    from prismfl.data.sources import load_split, to_float
    from prismfl.supervised import predict

    net, meta = domain_classifier("fashion-mnist", log=_no_training)
    assert meta["protocol"] == PROTOCOL and meta["sha256"] == FMNIST.sha256
    assert meta["test_accuracy"] == FMNIST.test_accuracy >= 0.93  # issue 12's bar for the evaluation embedder
    test = load_split("fashion-mnist", "test")
    predicted = predict(net, to_float(test.images, 28)).argmax(1)
    accuracy = float((predicted == torch.from_numpy(test.labels)).float().mean())
    assert abs(accuracy - FMNIST.test_accuracy) <= 5e-4  # a prediction or two may flip with the float summation order


def _copy(tmp_path, data: bytes):
    (tmp_path / FMNIST.file).write_bytes(data)
    return tmp_path


def test_a_missing_altered_or_misfitting_weights_file_is_a_clear_error(tmp_path):
    data = (WEIGHTS / FMNIST.file).read_bytes()
    with pytest.raises(WeightsError, match="the evaluation classifier .* is missing: reinstall prismfl"):
        load_shipped(FMNIST, EvalCNN(), CLASSIFIER, tmp_path)
    altered = bytearray(data)
    altered[-1] ^= 1
    with pytest.raises(WeightsError, match="fails its sha256 check"):
        load_shipped(FMNIST, EvalCNN(), CLASSIFIER, _copy(tmp_path, bytes(altered)))
    # the right checksum for a file that is not this net's weights (a net for 3-channel images)
    from safetensors.torch import save

    other = save(EvalCNN(channels=3).state_dict())
    wrong = dataclasses.replace(FMNIST, sha256=hashlib.sha256(other).hexdigest())
    with pytest.raises(WeightsError, match="does not fit its net"):
        load_shipped(wrong, EvalCNN(), CLASSIFIER, _copy(tmp_path, other))
    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"
    with pytest.raises(WeightsError, match="does not fit its net"):
        load_shipped(dataclasses.replace(FMNIST, sha256=hashlib.sha256(garbage).hexdigest()), EvalCNN(),
                     CLASSIFIER, _copy(tmp_path, garbage))  # fmt: skip


@needs_fmnist
def test_a_dataset_without_shipped_weights_trains_its_classifier_once_and_caches_it(tmp_path, monkeypatch):
    from test_run import _write_small_fmnist

    root = _write_small_fmnist(tmp_path, 300, 100)
    monkeypatch.setattr(classifier, "SHIPPED", {})
    logged = []
    _, meta = domain_classifier("fashion-mnist", str(root), log=logged.append)
    assert meta["protocol"] == PROTOCOL and meta["recipe"] == "prismfl-domain-v2" and len(meta["sha256"]) == 64
    assert len(logged) == 1 and "training the fashion-mnist evaluation classifier on 300" in logged[0]
    net, again = domain_classifier("fashion-mnist", str(root), log=_no_training)  # from the cache
    assert again["sha256"] == meta["sha256"] and not net.training
