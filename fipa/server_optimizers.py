"""Server optimizers: how the global model moves along the direction an aggregator proposes.

An aggregator proposes the round's model x~ (FedAvg's average, FIPA's solve); d = x~ - x is the round's direction
(the negative of FedOpt's pseudo-gradient). A server optimizer applies it to the global model x:

    sgd       x + lr d                                          (lr 1: x~ itself, bit for bit)
    momentum  m = beta m + d;                     x + lr m      (FedAvgM, Hsu et al., 2019)
    adagrad   m = b1 m + (1-b1) d;  v = v + d^2;                              x + lr m / (sqrt(v) + tau)
    adam      m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;                    x + lr m / (sqrt(v) + tau)
    yogi      m = b1 m + (1-b1) d;  v = v - (1-b2) d^2 sign(v - d^2);         x + lr m / (sqrt(v) + tau)

The adaptive rules are Algorithm 2 of Reddi et al. (ICLR 2021): no bias correction, m starts at 0 and v at tau^2
(the paper's v_{-1} >= tau^2). Every aggregator combines with every optimizer; the state (m, v) is checkpointed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fipa.errors import require

ADAPTIVE_RULES = ("adagrad", "adam", "yogi")


# ------------------------------------------------------------------------------------------------- pure math


def momentum_step(x: Tensor, direction: Tensor, m: Tensor, lr: float, momentum: float) -> tuple[Tensor, Tensor]:
    """FedAvgM: (x + lr m', m') with m' = momentum m + direction."""
    m = momentum * m + direction
    return x + lr * m, m


def second_moment(v: Tensor, direction: Tensor, beta2: float, rule: str) -> Tensor:
    """The adaptive rules' v after one direction (module docstring)."""
    squared = direction.square()
    if rule == "adagrad":
        return v + squared
    if rule == "adam":
        return beta2 * v + (1 - beta2) * squared
    if rule == "yogi":
        return v - (1 - beta2) * squared * torch.sign(v - squared)
    raise ValueError(f"unknown adaptive rule {rule!r}; known: {', '.join(ADAPTIVE_RULES)}")


def adaptive_step(
    x: Tensor, direction: Tensor, m: Tensor, v: Tensor, lr: float, beta1: float, beta2: float, tau: float, rule: str
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of FedAdagrad / FedAdam / FedYogi: (x', m', v')."""
    m = beta1 * m + (1 - beta1) * direction
    v = second_moment(v, direction, beta2, rule)
    return x + lr * m / (v.sqrt() + tau), m, v


# ---------------------------------------------------------------------------------------------- stateful shells


class ServerOptimizer(ABC):
    """Applies the aggregator's proposal to the global model; keeps whatever state it needs across rounds."""

    @abstractmethod
    def step(self, params: Tensor, proposed: Tensor) -> Tensor:
        """The new global model from the current one and the aggregator's proposal."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""


class ServerSGD(ServerOptimizer):
    def __init__(self, lr: float = 1.0):
        require(lr > 0, f"server_optimizer.lr must be > 0, got {lr}")
        self.lr = float(lr)

    def step(self, params: Tensor, proposed: Tensor) -> Tensor:
        if self.lr == 1.0:
            return proposed  # the aggregator's model untouched: x + (x~ - x) would round differently
        return params + self.lr * (proposed - params)


class ServerMomentum(ServerOptimizer):
    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        require(lr > 0, f"server_optimizer.lr must be > 0, got {lr}")
        require(0 <= momentum < 1, f"server_optimizer.momentum must be in [0, 1), got {momentum}")
        self.lr, self.momentum = float(lr), float(momentum)
        self._m: Tensor | None = None

    def step(self, params: Tensor, proposed: Tensor) -> Tensor:
        m = torch.zeros_like(params) if self._m is None else self._m
        new, self._m = momentum_step(params, proposed - params, m, self.lr, self.momentum)
        return new

    def state_dict(self) -> dict:
        return {"m": self._m}

    def load_state_dict(self, state: dict) -> None:
        self._m = state.get("m")


class ServerAdaptive(ServerOptimizer):
    """FedAdagrad, FedAdam or FedYogi (`rule`), Reddi et al.'s Algorithm 2."""

    def __init__(
        self, rule: str = "adam", lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ):
        require(
            rule in ADAPTIVE_RULES, f"server_optimizer.rule must be one of {', '.join(ADAPTIVE_RULES)}, got {rule!r}"
        )
        require(lr > 0, f"server_optimizer.lr must be > 0, got {lr}")
        require(0 <= beta1 < 1, f"server_optimizer.beta1 must be in [0, 1), got {beta1}")
        require(0 <= beta2 < 1, f"server_optimizer.beta2 must be in [0, 1), got {beta2}")
        require(tau > 0, f"server_optimizer.tau (the adaptivity) must be > 0, got {tau}")
        self.rule, self.lr, self.beta1, self.beta2, self.tau = rule, float(lr), float(beta1), float(beta2), float(tau)
        self._m: Tensor | None = None
        self._v: Tensor | None = None

    def step(self, params: Tensor, proposed: Tensor) -> Tensor:
        m = torch.zeros_like(params) if self._m is None else self._m
        v = torch.full_like(params, self.tau**2) if self._v is None else self._v
        new, self._m, self._v = adaptive_step(
            params, proposed - params, m, v, self.lr, self.beta1, self.beta2, self.tau, self.rule
        )
        return new

    def state_dict(self) -> dict:
        return {"m": self._m, "v": self._v}

    def load_state_dict(self, state: dict) -> None:
        self._m, self._v = state.get("m"), state.get("v")
