"""FIPA: Fisher-Informed Parameterwise Aggregation (FIPA_SPEC sections 3-4).

    H = sum_m w_m U_m diag(lam_m) U_m^T,   b = sum_m w_m U_m diag(lam_m) U_m^T Delta_m,
    theta <- theta + step_size * solve(H, b),   w_m = N_m / sum N.

Each client's curvature arrives as low-rank factors; the server keeps them (they are what the solve needs)
and streams b, so a round never holds a p x p matrix nor more than one copy of the model per client factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fipa.aggregators import functional as AF
from fipa.aggregators.base import Aggregator
from fipa.client import ClientCallback, ClientUpdate
from fipa.curvature.callback import CurvatureCallback
from fipa.curvature.eigen import effective_rank
from fipa.curvature.ggn import ESTIMATORS
from fipa.errors import require
from fipa.parameters import FlatParameters

SOLVERS = ("pinv", "damped")
OTHERS = ("fedavg", "freeze")
REPRESENTATIONS = ("lowrank", "diagonal")
DIAGNOSTICS = (
    "curvature_rank_mean",  # eigenpairs kept per client (at most r; fewer when the spectrum is shorter)
    "effective_rank_mean",  # exp(entropy) of each client's kept spectrum, averaged: the directions that matter
    "eigenvalue_max",  # largest kept eigenvalue over the clients
    "eigenvalue_min",  # smallest kept eigenvalue over the clients (with eigenvalue_max: the spectrum's range)
    "update_in_subspace_mean",  # share ||U^T Delta||^2 / ||Delta||^2 of each client's update inside its subspace
    "update_in_subspace_min",
)


class FIPA(Aggregator):
    def __init__(
        self,
        rank: int | None = 20,
        step_size: float = 0.5,
        solver: str = "pinv",
        rcond: float = 1e-5,
        beta: float = 0.5,
        gamma: float = 0.5,
        estimator: str = "ggn",
        curvature_at: str = "start",
        eigensolver: str = "auto",
        oversample: int = 10,
        power_iters: int = 2,
        sample_block: int = 256,
        curvature_samples: int | None = None,
        params: str | list[str] | None = None,
        others: str = "fedavg",
        representation: str = "lowrank",
        seed: int = 0,
    ):
        require(rank is None or rank >= 1, f"aggregator.rank must be >= 1 or null (full rank), got {rank}")
        require(step_size > 0, f"aggregator.step_size must be > 0, got {step_size}")
        require(solver in SOLVERS, f"aggregator.solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        require(rcond > 0, f"aggregator.rcond must be > 0, got {rcond}")
        require(beta > 0, f"aggregator.beta must be > 0, got {beta}")
        require(gamma > 0, f"aggregator.gamma must be > 0, got {gamma}")
        require(
            estimator in ESTIMATORS, f"aggregator.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        )
        require(
            curvature_at in ("start", "epoch_end"),
            f"aggregator.curvature_at must be start or epoch_end, got {curvature_at!r}",
        )
        require(
            eigensolver in ("auto", "exact", "randomized"),
            f"aggregator.eigensolver must be auto, exact or randomized, got {eigensolver!r}",
        )
        require(
            not (eigensolver == "randomized" and rank is None),
            "aggregator.eigensolver=randomized needs a finite aggregator.rank (full rank needs eigensolver=exact)",
        )
        require(oversample >= 0 and power_iters >= 0, "aggregator.oversample and aggregator.power_iters must be >= 0")
        require(sample_block >= 1, f"aggregator.sample_block must be >= 1, got {sample_block}")
        require(
            curvature_samples is None or curvature_samples >= 1,
            f"aggregator.curvature_samples must be >= 1 or null (all local data), got {curvature_samples}",
        )
        require(others in OTHERS, f"aggregator.others must be one of {', '.join(OTHERS)}, got {others!r}")
        require(
            representation in REPRESENTATIONS,
            f"aggregator.representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}",
        )
        self.step_size = float(step_size)
        self.solver = solver
        self.rcond, self.beta, self.gamma = float(rcond), float(beta), float(gamma)
        self.params = params
        self.others = others
        self.representation = representation
        self.required_statistics = (
            ("curvature_diagonal",) if representation == "diagonal" else ("eigenvectors", "eigenvalues")
        )
        self.diagnostic_keys = () if representation == "diagonal" else DIAGNOSTICS
        self.curvature = CurvatureCallback(
            rank=rank,
            estimator=estimator,
            at=curvature_at,
            eigensolver=eigensolver,
            representation=representation,
            oversample=oversample,
            power_iters=power_iters,
            sample_block=sample_block,
            max_samples=curvature_samples,
            freeze_others=others == "freeze",
            seed=seed,
        )

    def client_callbacks(self) -> list[ClientCallback]:
        return [self.curvature]

    def bind(self, flat: FlatParameters) -> None:
        names = flat.matching_names(self.params)
        require(
            bool(names), f"aggregator.params={self.params!r} matches no parameter; names are: {', '.join(flat.names)}"
        )
        self.curvature.param_names = names
        self.mask = flat.mask(self.params)
        self.all_selected = bool(self.mask.all())

    # Streaming round --------------------------------------------------------------------------------------
    def reset(self, global_params: Tensor) -> None:
        self._global = global_params
        self._total = 0
        self._update_sum = torch.zeros_like(global_params)  # sum N_m Delta_m: FedAvg for unselected parameters
        self._eigenvectors: list[Tensor] = []
        self._eigenvalues: list[Tensor] = []
        self._counts: list[int] = []
        self._rhs = torch.zeros(int(self.mask.sum()), dtype=global_params.dtype)  # sum N_m H_m Delta_m
        self._diag_sum = torch.zeros_like(self._rhs)  # sum N_m d_m (diagonal representation)
        self._in_subspace: list[float] = []

    def update(self, update: ClientUpdate) -> None:
        n = update.num_samples
        delta = update.delta if self.all_selected else update.delta[self.mask]
        self._total += n
        self._update_sum.add_(update.delta, alpha=n)
        if self.representation == "diagonal":
            diagonal = update.statistics["curvature_diagonal"]
            self._rhs.addcmul_(diagonal, delta, value=n)
            self._diag_sum.add_(diagonal, alpha=n)
            return
        U, lam = update.statistics["eigenvectors"], update.statistics["eigenvalues"]
        self._rhs += AF.factor_rhs(U, lam, n, delta)
        self._eigenvectors.append(U)
        self._eigenvalues.append(lam)
        self._counts.append(n)
        coefficients = U.T @ delta  # share of the update inside the client's Fisher subspace (diagnostic)
        self._in_subspace.append(float(coefficients.square().sum() / delta.square().sum().clamp_min(1e-300)))

    def compute(self) -> Tensor:
        if self._total == 0:
            return self._global
        fedavg_step = self._update_sum / self._total
        new = self._global.clone()
        b = self._rhs / self._total
        if self.representation == "diagonal":
            direction = self._diagonal_solve(b, fedavg_step)
        else:
            F = AF.stack_scaled_factors(self._eigenvectors, self._eigenvalues, [n / self._total for n in self._counts])
            if self.solver == "pinv":
                direction = AF.lowrank_pinv_solve(F, b, self.rcond, overwrite_factor=True)
            else:
                direction = AF.lowrank_damped_solve(F, b, self.beta, self.gamma, overwrite_factor=True)
        if self.all_selected:
            return new.add_(direction, alpha=self.step_size)
        new[self.mask] += self.step_size * direction
        if self.others == "fedavg":
            new[~self.mask] += fedavg_step[~self.mask]
        return new

    def _diagonal_solve(self, b: Tensor, fedavg_step: Tensor) -> Tensor:
        """Per-coordinate Fisher-weighted mean; coordinates no client's curvature sees fall back to FedAvg."""
        diag = self._diag_sum / self._total
        keep = diag > self.rcond * diag.max()
        fallback = fedavg_step if self.all_selected else fedavg_step[self.mask]
        return torch.where(keep, b / torch.where(keep, diag, torch.ones_like(diag)), fallback)

    def diagnostics(self) -> dict[str, float]:
        if self.representation == "diagonal":
            return {}
        ranks = [lam.numel() for lam in self._eigenvalues]
        kept = [lam for lam in self._eigenvalues if lam.numel()]
        return {
            "curvature_rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
            "effective_rank_mean": sum(effective_rank(lam) for lam in kept) / len(kept) if kept else 0.0,
            "eigenvalue_max": max(float(lam.max()) for lam in kept) if kept else 0.0,
            "eigenvalue_min": min(float(lam.min()) for lam in kept) if kept else 0.0,
            "update_in_subspace_mean": sum(self._in_subspace) / len(self._in_subspace)
            if self._in_subspace
            else float("nan"),
            "update_in_subspace_min": min(self._in_subspace) if self._in_subspace else float("nan"),
        }
