"""A federated task: the clients' data, the client LightningModule, and the global test metric."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fipa.client import ClientModule
from fipa.data import batch_loader
from fipa.errors import ConfigError


class WithheldDataset(Dataset):
    """Another client's data, which this process does not hold."""

    def __init__(self, client_id: int):
        self.client_id = client_id

    def __len__(self) -> int:
        raise ConfigError(f"client {self.client_id}'s data is not held here (FederatedTask.keep_only)")

    def __getitem__(self, index):
        return len(self)

    def to(self, device) -> WithheldDataset:
        return self


class FederatedTask(ABC):
    """Subclasses fill `self.datasets` with one dataset per client and define the module and the metric."""

    metric: str  # the headline test metric, a column of metrics.csv
    lower_is_better: bool = True
    input_dim: int
    output_dim: int
    datasets: list[Dataset]

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size  # None: full batch

    @property
    def num_clients(self) -> int:
        return len(self.datasets)

    def client_dataset(self, client_id: int) -> Dataset:
        return self.datasets[client_id]

    def keep_only(self, client_id: int) -> None:
        """Drop every other client's data (a Flower SuperNode holds its own partition and nothing else)."""
        self.datasets = [d if i == client_id else WithheldDataset(i) for i, d in enumerate(self.datasets)]

    def client_loader(self, client_id: int, generator: torch.Generator) -> DataLoader:
        shuffle = self.batch_size is not None  # a full batch needs no shuffling
        return batch_loader(self.client_dataset(client_id), self.batch_size, shuffle, generator)

    @abstractmethod
    def build_module(self, model: nn.Module, optimizer) -> ClientModule: ...

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test metrics of the global model (must include `self.metric`)."""

    def to(self, device: torch.device | str) -> FederatedTask:
        """Move the clients' data and the test data to `device` once, for the whole run (in place). Datasets move
        with their own `to`; every tensor attribute of the task moves too."""
        self.datasets = [dataset.to(device) for dataset in self.datasets]  # type: ignore[attr-defined]
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def save_artifacts(self, model: nn.Module, output_dir) -> None:
        """Figures or files worth keeping with a finished run (e.g. solution plots); nothing by default."""
