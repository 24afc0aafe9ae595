"""The flat parameter vector: the unit that clients upload and the server aggregates."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FlatParameters:
    """Reads and writes a module's parameters as one flat vector, in `named_parameters` order."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [name for name, _ in module.named_parameters()]
        self._params: list[Tensor] = [p for _, p in module.named_parameters()]
        self.sizes = [p.numel() for p in self._params]
        self.numel = sum(self.sizes)

    def get(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    @torch.no_grad()
    def set(self, vector: Tensor) -> None:
        torch._foreach_copy_(self._params, [v.view_as(p) for v, p in zip(vector.split(self.sizes), self._params)])

    def mask(self, patterns: str | Sequence[str] | None) -> Tensor:
        """Boolean mask over the flat vector of the parameters whose names match any glob pattern."""
        if patterns is None:
            return torch.ones(self.numel, dtype=torch.bool)
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        chunks = [
            torch.full((size,), any(fnmatch.fnmatchcase(name, pat) for pat in patterns), dtype=torch.bool)
            for name, size in zip(self.names, self.sizes)
        ]
        return torch.cat(chunks)

    def matching_names(self, patterns: str | Sequence[str] | None) -> list[str]:
        if patterns is None:
            return list(self.names)
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return [n for n in self.names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
