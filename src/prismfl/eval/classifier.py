"""The domain classifier every quality figure uses: for FashionMNIST the weights that ship with prismfl
(prismfl/weights/, pinned by their sha256: shipped.py), for other datasets trained by prismfl on the training split
and cached with a checksum.

It sees only the evaluation side (it is never part of training), and its 128-d penultimate layer is
the embedding for the domain FID and PRDC. Training it is seeded but not bit-reproducible across
machines and thread counts (three FashionMNIST classifiers from the same seed tested 0.9315, 0.9311
and 0.9298, and moved the same models' domain FIDs by up to 2), so the weights are shipped: every
machine then scores with the same classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from prismfl.cache import cached_state_dict
from prismfl.data.sources import dataset_info, load_split, to_float
from prismfl.shipped import Shipped, load_shipped
from prismfl.supervised import predict, train_classifier

# The evaluation protocol's version: it names the classifier (architecture, schedule) whose embedding
# every quality figure uses. Figures of different versions are not comparable; every output says which.
# v1: conv32-pool-conv64-pool-fc128, 2 epochs of Adam (FashionMNIST test accuracy 0.890).
# v2: BatchNorm, three convs, dropout, 10 epochs on a one-cycle schedule (test accuracy 0.9315; retrained
#     on another machine or thread count, 0.9298 to 0.9311).
# v3: v2's net and schedule; FashionMNIST's weights ship with prismfl (the one a fresh 2-core `make demo`
#     trained, test accuracy 0.9311), so the figures of every machine are comparable.
PROTOCOL = "prismfl-domain-v3"
RECIPE = "prismfl-domain-v2"  # the training recipe, in the cache key of the classifiers prismfl trains
EPOCHS = 10
LR = 3e-3
WEIGHT_DECAY = 5e-4
SEED = 0


SHIPPED = {  # (dataset, size) -> weights; trained with the recipe below on 2 CPU cores, two threads, 2026-11-27
    ("fashion-mnist", 28): Shipped(
        "eval-fashion-mnist-v3.safetensors", "c03cd64a9726a4fd151415226b091a82543ac4cacabf3614aef29924001a2e10", 0.9311
    ),
}
CLASSIFIER = "the evaluation classifier"


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class EvalCNN(nn.Module):
    """The evaluation classifier: conv16-pool-conv32-conv32-pool-fc128-fc10, BatchNorm after every
    layer but the last, dropout before it; the 128-d layer is the embedding."""

    def __init__(self, channels: int = 1, img_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(channels, 16), nn.MaxPool2d(2), *_conv_bn(16, 32), *_conv_bn(32, 32), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (img_size // 4) ** 2, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def domain_classifier(dataset: str, root: str | None = None, size: int = 28, log=print) -> tuple[EvalCNN, dict]:
    """(classifier in eval mode, metadata with its test accuracy and checksum): the shipped weights
    where there are some, else trained on the training split (cached afterwards)."""
    info = dataset_info(dataset)
    shipped = SHIPPED.get((dataset, size))
    if shipped is not None:
        net = load_shipped(shipped, EvalCNN(info.channels, size, len(info.class_names)), CLASSIFIER)
        return net.eval(), {"test_accuracy": shipped.test_accuracy, "protocol": PROTOCOL, "sha256": shipped.sha256,
                            "weights": f"shipped with prismfl ({shipped.file})"}  # fmt: skip
    train = load_split(dataset, "train", root)
    channels, classes = train.images.shape[1], len(info.class_names)
    spec = {"kind": "eval-classifier", "version": RECIPE, "dataset": dataset, "source": train.source,
            "size": size, "epochs": EPOCHS, "seed": SEED, "n": len(train), "seeded_dropout": True}  # fmt: skip

    def build():
        log(f"training the {dataset} evaluation classifier on {len(train):,} training images (cached afterwards)")
        with torch.random.fork_rng(devices=[]):  # init and dropout from the seed, not from whatever ran before
            torch.manual_seed(SEED)
            net = EvalCNN(channels, size, classes)
            train_classifier(
                net, to_float(train.images, size), torch.from_numpy(train.labels), epochs=EPOCHS, seed=SEED, lr=LR,
                weight_decay=WEIGHT_DECAY, one_cycle=True, desc="evaluation classifier",
            )  # fmt: skip
        test = load_split(dataset, "test", root)
        predicted = predict(net, to_float(test.images, size)).argmax(1)
        acc = float((predicted == torch.from_numpy(test.labels)).float().mean())
        return net.state_dict(), {"test_accuracy": acc, "recipe": RECIPE}

    state, meta = cached_state_dict("classifier", spec, build, log)
    net = EvalCNN(channels, size, classes)
    net.load_state_dict(state)
    return net.eval(), {**meta, "protocol": PROTOCOL}


def train_on_synthetic(images: torch.Tensor, labels: torch.Tensor, dataset: str, root: str | None = None) -> dict:
    """Train on synthetic, test on real: the evaluation CNN trained from its seed on generated labelled
    images for the evaluation classifier's fixed schedule (no selection on any real data: DPImageBench
    shows that selecting on the sensitive test set leaks and inflates), then its accuracy on the real
    test set, beside the same CNN trained on the real training split."""
    info = dataset_info(dataset)
    if len(images) != len(labels) or len(images) < 2:
        raise ValueError("train-on-synthetic needs at least two images, one label each")
    _, meta = domain_classifier(dataset, root, info.size)
    if images.shape[-1] != info.size:  # a generator at another size (data.resize): judged at the dataset's
        images = torch.nn.functional.interpolate(images, size=(info.size, info.size), mode="bilinear",
                                                 antialias=True, align_corners=False)  # fmt: skip
    test = load_split(dataset, "test", root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = EvalCNN(images.shape[1], info.size, len(info.class_names))
        train_classifier(net, images, labels.long(), epochs=EPOCHS, seed=SEED, lr=LR, weight_decay=WEIGHT_DECAY,
                         one_cycle=True, desc="train on synthetic")  # fmt: skip
    predicted = predict(net, to_float(test.images, info.size)).argmax(1)
    truth = torch.from_numpy(test.labels.astype("int64"))
    per_class = [float((predicted[truth == c] == c).float().mean()) for c in range(len(info.class_names))]
    return {"tstr_accuracy": float((predicted == truth).float().mean()), "tstr_per_class": per_class,
            "real_accuracy": float(meta["test_accuracy"]), "tstr_images": len(images)}  # fmt: skip
