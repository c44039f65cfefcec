"""The domain classifier every quality figure uses: trained by prismfl on a dataset's training split.

It sees only the evaluation side (it is never part of training), is cached with a checksum, and
its 128-d penultimate layer is the embedding for the domain FID and PRDC.
"""

from __future__ import annotations

import torch
from torch import nn

from prismfl.cache import cached_state_dict
from prismfl.data.sources import dataset_info, load_split, to_float
from prismfl.supervised import train_classifier

EPOCHS = 2
SEED = 0


class EvalCNN(nn.Module):
    """The evaluation classifier: conv32-pool-conv64-pool-fc128-fc10; its 128-d layer is the embedding."""

    def __init__(self, channels: int = 1, img_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (img_size // 4) ** 2, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def domain_classifier(dataset: str, root: str | None = None, size: int = 28, log=print) -> tuple[EvalCNN, dict]:
    """(classifier in eval mode, metadata with its test accuracy and checksum)."""
    train = load_split(dataset, "train", root)
    channels, classes = train.images.shape[1], len(dataset_info(dataset).class_names)
    spec = {"kind": "eval-classifier", "version": 1, "dataset": dataset, "source": train.source,
            "size": size, "epochs": EPOCHS, "seed": SEED, "n": len(train)}  # fmt: skip

    def build():
        log(f"training the {dataset} evaluation classifier on {len(train):,} training images (cached afterwards)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            net = EvalCNN(channels, size, classes)
        train_classifier(
            net, to_float(train.images, size), torch.from_numpy(train.labels), epochs=EPOCHS, seed=SEED,
            desc="evaluation classifier",
        )  # fmt: skip
        test = load_split(dataset, "test", root)
        with torch.no_grad():
            acc = float((net(to_float(test.images, size)).argmax(1) == torch.from_numpy(test.labels)).float().mean())
        return net.state_dict(), {"test_accuracy": acc}

    state, meta = cached_state_dict("classifier", spec, build, log)
    net = EvalCNN(channels, size, classes)
    net.load_state_dict(state)
    return net.eval(), meta
