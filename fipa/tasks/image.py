"""Image classification on real data sets split across clients by a partitioner (FIPA_SPEC 5.3)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fipa import partition as partitioning
from fipa.datasets import NUM_CLASSES, cifar_augment, load_dataset
from fipa.errors import require
from fipa.seeding import DATA, numpy_rng
from fipa.tasks.classification import ClassificationModule, ClassificationTask


class ImageClassification(ClassificationTask):
    """`dataset` split over `num_clients` by `partition` (a dict: name plus the scheme's options)."""

    def __init__(
        self,
        dataset: str,
        seed: int,
        partition: dict,
        num_clients: int = 100,
        root: str | None = None,
        batch_size: int | None = 50,
        augment: bool = False,
        train_subset: int | None = None,
        test_subset: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        require(train_subset is None or train_subset >= num_clients, "task.train_subset must be >= task.num_clients")
        images, labels = load_dataset(dataset, root, train=True)
        test_images, test_labels = load_dataset(dataset, root, train=False)
        rng = numpy_rng(seed, DATA)
        if train_subset is not None and train_subset < len(labels):  # small, seeded subsets for tests and demos
            keep = torch.from_numpy(rng.permutation(len(labels))[:train_subset])
            images, labels = images[keep], labels[keep]
        if test_subset is not None and test_subset < len(test_labels):
            test_images, test_labels = test_images[:test_subset], test_labels[:test_subset]
        options = {k: v for k, v in dict(partition).items() if k != "name"}
        parts = partitioning.partition(partition["name"], labels.numpy(), num_clients, rng, **options)
        self.histogram = partitioning.class_histogram(labels.numpy(), parts, NUM_CLASSES[dataset])
        images, test_images = images.to(dtype), test_images.to(dtype)
        client_data = [(images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)]) for idx in parts]
        super().__init__(client_data, (test_images, test_labels), NUM_CLASSES[dataset], batch_size)
        self.augment = augment

    def build_module(self, model: nn.Module, optimizer) -> ClassificationModule:
        module = ClassificationModule(model, optimizer)
        if self.augment:  # random crop (pad 4) + horizontal flip, training batches only
            module.augment = cifar_augment
        return module

    def save_artifacts(self, model: nn.Module, output_dir) -> None:
        partitioning.save_histogram(self.histogram, Path(output_dir) / "class_histogram")
