"""One round of K-FAC curvature on the server, shared by FIPA (representation=kfac) and FedFisher (kfac).

The curvature is block diagonal: per Kronecker-factored layer H_l = sum_m w_m kron(G_m, A_m), and a diagonal
sum_m w_m d_m for the other selected parameters (fipa.curvature.kfac). The right-hand side
b = sum_m w_m H_m Delta_m is streamed as clients arrive (G_m Delta_m A_m per layer: Kronecker matvecs); the
factors are kept, since the solve's operator needs every client's. The solves run in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fipa.aggregators import functional as AF
from fipa.curvature.kfac import KFACLayout, kfac_solve, kron_sum_matvec, unpack

#: What a client uploads for K-FAC: the packed input factors A, the packed output-gradient factors G, and the
#: diagonal of the parameters no layer covers (empty when there are none). bytes_up_<kind> counts each.
KFAC_STATISTICS = ("kfac_input_factors", "kfac_output_factors", "curvature_diagonal")


class KFACRound:
    def __init__(self, layout: KFACLayout, factor_rank: int | None = None):
        self.layout = layout
        # the clients' large factors arrive as this many eigenpairs (fipa.curvature.kfac.pack); None: dense
        self.factor_rank = factor_rank

    def reset(self, device: torch.device) -> None:
        dt = torch.float64
        self._device = device
        self._As: list[list[Tensor]] = [[] for _ in self.layout.layers]
        self._Gs: list[list[Tensor]] = [[] for _ in self.layout.layers]
        self._counts: list[int] = []
        self._rhs = [
            torch.zeros(o, i, dtype=dt, device=device) for o, i in zip(self.layout.out_dims, self.layout.in_dims)
        ]
        rest = len(self.layout.rest)
        self._rest_rhs = torch.zeros(rest, dtype=dt, device=device)  # sum N_m d_m * Delta_m
        self._rest_diag = torch.zeros(rest, dtype=dt, device=device)  # sum N_m d_m
        self.iterations = 0  # the most CG iterations any layer took in the last solve

    @property
    def total(self) -> int:
        return sum(self._counts)

    def add(self, statistics: dict[str, Tensor], delta: Tensor, num_samples: int) -> None:
        """Fold one client's factors and its update (on the selected parameters) into the round."""
        layout, dt = self.layout, torch.float64
        As = unpack(statistics["kfac_input_factors"].to(dt), layout.in_dims, self.factor_rank)
        Gs = unpack(statistics["kfac_output_factors"].to(dt), layout.out_dims, self.factor_rank)
        delta = delta.to(dt)
        for index, (X, A, G) in enumerate(zip(layout.matrices(delta), As, Gs)):
            self._rhs[index].add_(G @ X @ A, alpha=num_samples)
            self._As[index].append(A)
            self._Gs[index].append(G)
        rest = layout.rest.to(delta.device)
        AF.accumulate_diagonal(
            self._rest_rhs, self._rest_diag, delta[rest], statistics["curvature_diagonal"].to(dt), num_samples
        )
        self._counts.append(num_samples)

    def _weights(self) -> Tensor:
        return torch.tensor(self._counts, dtype=torch.float64, device=self._device) / self.total

    def rhs(self) -> Tensor:
        """b = sum_m w_m H_m Delta_m (w_m = N_m / sum N), a vector of the selected parameters."""
        total = self.total
        return self.layout.vector([b / total for b in self._rhs], self._rest_rhs / total)

    def matvec(self, x: Tensor) -> Tensor:
        """H x, H = sum_m w_m H_m (block diagonal: Kronecker sums per layer, the diagonal elsewhere)."""
        x, weights = x.to(torch.float64), self._weights()
        blocks = [
            kron_sum_matvec(torch.stack(Gs), torch.stack(As), weights, X)
            for X, As, Gs in zip(self.layout.matrices(x), self._As, self._Gs)
        ]
        rest = self.layout.rest.to(x.device)
        return self.layout.vector(blocks, self._rest_diag / self.total * x[rest])

    def solve(self, damping: float, anchor: Tensor | None = None, rtol: float = 1e-8, max_iters: int = 1000) -> Tensor:
        """(H + damping I)^{-1} (b + damping anchor) (anchor None: 0), by CG per layer and elementwise on the
        diagonal. damping 0 is allowed only without layers: a flat diagonal coordinate then takes the anchor."""
        total, weights = self.total, self._weights()
        anchor64 = None if anchor is None else anchor.to(torch.float64)
        anchors = [None] * len(self._rhs) if anchor64 is None else self.layout.matrices(anchor64)
        blocks, self.iterations = [], 0
        for b, As, Gs, a in zip(self._rhs, self._As, self._Gs, anchors):
            B = b / total if a is None else b / total + damping * a
            X, iterations = kfac_solve(torch.stack(Gs), torch.stack(As), weights, B, damping, rtol, max_iters)
            blocks.append(X)
            self.iterations = max(self.iterations, iterations)
        rest_rhs, rest_diagonal = self._rest_rhs / total, self._rest_diag / total
        rest_anchor = torch.zeros_like(rest_rhs) if anchor64 is None else anchor64[self.layout.rest.to(self._device)]
        return self.layout.vector(blocks, AF.diagonal_fisher_solve(rest_rhs, rest_diagonal, rest_anchor, damping))
