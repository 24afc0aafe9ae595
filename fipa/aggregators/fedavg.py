"""FedAvg and FedProx (FedAvg on the server, a proximal term on the client)."""

from __future__ import annotations

import torch
from torch import Tensor

from fipa.aggregators import functional as AF
from fipa.aggregators.base import Aggregator
from fipa.client import ClientCallback, ClientUpdate
from fipa.client_methods import ProximalTerm
from fipa.errors import require


class FedAvg(Aggregator):
    """theta + step * sum_m N_m Delta_m / sum_m N_m, accumulated as clients arrive (memory of one model)."""

    def __init__(self, step_size: float = 1.0):
        require(step_size > 0, f"aggregator.step_size must be > 0, got {step_size}")
        self.step_size = float(step_size)

    def reset(self, global_params: Tensor) -> None:
        self._global = global_params
        self._weighted_sum = torch.zeros_like(global_params)
        self._total_samples = 0

    def update(self, update: ClientUpdate) -> None:
        AF.accumulate_weighted(self._weighted_sum, update.delta, update.num_samples)
        self._total_samples += update.num_samples

    def compute(self) -> Tensor:
        if self._total_samples == 0:
            return self._global
        return self._global + AF.mean_from_sum(self._weighted_sum, self._total_samples, self.step_size)


class FedProx(FedAvg):
    """FedAvg whose clients minimise their loss plus mu/2 ||w - w_global||^2 (Li et al., 2020)."""

    def __init__(self, mu: float = 0.01, step_size: float = 1.0):
        super().__init__(step_size)
        self.proximal = ProximalTerm(mu)  # validates mu

    def client_callbacks(self) -> list[ClientCallback]:
        return [self.proximal]
