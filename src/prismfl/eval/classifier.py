"""The domain classifier every quality figure uses: trained by prismfl on a dataset's training split.

It sees only the evaluation side (it is never part of training), is cached with a checksum, and
its 128-d penultimate layer is the embedding for the domain FID and PRDC.
"""

from __future__ import annotations

import torch
from torch import nn

from prismfl.cache import cached_state_dict
from prismfl.data.sources import dataset_info, load_split, to_float
from prismfl.supervised import predict, train_classifier

# The evaluation protocol's version: it names the classifier (architecture, schedule) whose embedding
# every quality figure uses. Figures of different versions are not comparable; every output says which.
# v1: conv32-pool-conv64-pool-fc128, 2 epochs of Adam (FashionMNIST test accuracy 0.890).
# v2: BatchNorm, three convs, dropout, 10 epochs on a one-cycle schedule (test accuracy 0.9315).
PROTOCOL = "prismfl-domain-v2"
EPOCHS = 10
LR = 3e-3
WEIGHT_DECAY = 5e-4
SEED = 0


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
    """(classifier in eval mode, metadata with its test accuracy and checksum)."""
    train = load_split(dataset, "train", root)
    channels, classes = train.images.shape[1], len(dataset_info(dataset).class_names)
    spec = {"kind": "eval-classifier", "version": PROTOCOL, "dataset": dataset, "source": train.source,
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
        return net.state_dict(), {"test_accuracy": acc, "protocol": PROTOCOL}

    state, meta = cached_state_dict("classifier", spec, build, log)
    net = EvalCNN(channels, size, classes)
    net.load_state_dict(state)
    return net.eval(), meta


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
