"""Small, fast in-memory datasets and loaders for client-local training."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


class TensorData(Dataset):
    """Tensors sharing their first dimension; indexing with a list of indices returns whole batches at once."""

    def __init__(self, *tensors: Tensor):
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("TensorData needs tensors with the same first dimension")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index):
        if isinstance(index, Tensor):  # indices drawn on the CPU (seeded generators) index data on any device
            index = index.to(self.tensors[0].device, non_blocking=True)
        return tuple(t[index] for t in self.tensors)

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(*(t.to(device) for t in self.tensors))


class BatchIndexSampler(Sampler):
    """Yields whole batches of indices as tensors (a slice for an unshuffled full batch: no copy at all)."""

    def __init__(self, size: int, batch_size: int | None, shuffle: bool, generator: torch.Generator | None = None):
        self.size, self.batch_size, self.shuffle, self.generator = size, batch_size or size, shuffle, generator

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    @property
    def whole_dataset(self) -> bool:
        """Every epoch yields the same single batch, the whole data set in order."""
        return not self.shuffle and self.batch_size >= self.size

    def __iter__(self):
        if self.whole_dataset:
            yield slice(None)
            return
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        yield from order.split(self.batch_size)


def batch_loader(
    dataset: Dataset, batch_size: int | None, shuffle: bool, generator: torch.Generator | None = None
) -> DataLoader:
    """A DataLoader that fetches each batch with one indexing call instead of collating sample by sample.

    `batch_size=None` means full batch (the regression and PINN presets train full-batch).
    """
    sampler = BatchIndexSampler(len(dataset), batch_size, shuffle, generator)  # type: ignore[arg-type]
    return DataLoader(dataset, sampler=sampler, batch_size=None)
