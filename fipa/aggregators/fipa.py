"""FIPA: Fisher-Informed Parameterwise Aggregation (FIPA_SPEC sections 3-4).

    H = sum_m w_m U_m diag(lam_m) U_m^T,   b = sum_m w_m U_m diag(lam_m) U_m^T Delta_m,
    theta <- theta + step_size * solve(H, b),   w_m = N_m / sum N.

Each client's curvature arrives as low-rank factors; the server keeps them (they are what the solve needs)
and streams b, so a round never holds a p x p matrix nor more than one copy of the model per client factor.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ModeDefaults:
    """Settings that apply only in some modes default to None, which means "the mode's default" (these) where they
    apply; a value given where a setting does not apply is an error, never silently ignored."""

    solver: str = "pinv"
    eigensolver: str = "auto"
    rcond: float = 1e-5
    beta: float = 0.5
    gamma: float = 0.5
    oversample: int = 10
    power_iters: int = 2


DEFAULTS = ModeDefaults()


def _unused_settings(representation: str, solver: str | None, eigensolver: str | None, given: dict) -> dict[str, str]:
    """The settings given (not None) that the chosen mode does not use, each with the mode that leaves it unused."""
    unused: dict[str, str] = {}
    if representation == "diagonal":
        for name in ("rank", "solver", "eigensolver", "oversample", "power_iters", "beta", "gamma"):
            unused[name] = "representation=diagonal"
    else:
        if (solver or DEFAULTS.solver) == "pinv":
            unused.update(beta="solver=pinv", gamma="solver=pinv")
        else:
            unused["rcond"] = f"solver={solver}"
        if eigensolver == "exact":  # subspace iteration's settings; `auto` may choose it, so they stay usable there
            unused.update(oversample="eigensolver=exact", power_iters="eigensolver=exact")
    return {name: mode for name, mode in unused.items() if given[name] is not None}


class FIPA(Aggregator):
    def __init__(
        self,
        rank: int | None = 20,
        step_size: float = 0.5,
        solver: str | None = None,  # pinv (default) | damped
        rcond: float | None = None,  # pinv and diagonal: eigenvalues below rcond * largest are dropped (1e-5)
        beta: float | None = None,  # damped: damping (0.5)
        gamma: float | None = None,  # damped: scale (0.5)
        estimator: str = "ggn",
        curvature_at: str = "start",
        eigensolver: str | None = None,  # auto (default) | exact | randomized
        oversample: int | None = None,  # subspace iteration: s (10)
        power_iters: int | None = None,  # subspace iteration: q (2)
        sample_block: int = 256,
        curvature_samples: int | None = None,
        params: str | list[str] | None = None,
        others: str = "fedavg",
        representation: str = "lowrank",
        seed: int = 0,
    ):
        require(
            representation in REPRESENTATIONS,
            f"aggregator.representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}",
        )
        given = {"rank": rank, "solver": solver, "rcond": rcond, "beta": beta, "gamma": gamma, "eigensolver": eigensolver,
                 "oversample": oversample, "power_iters": power_iters}  # fmt: skip
        unused = _unused_settings(representation, solver, eigensolver, given)
        require(
            not unused,
            "; ".join(f"aggregator.{name}={given[name]} has no effect with {mode}" for name, mode in unused.items())
            + ": leave it unset (null) or choose the mode that uses it"
            + (" (aggregator=fipa_diag is the diagonal with its settings)" if representation == "diagonal" else ""),
        )
        require(
            not (others == "freeze" and params is None),
            "aggregator.others=freeze freezes the parameters aggregator.params does not select, but params=null "
            "selects all of them; set aggregator.params (e.g. '6.*') or use others=fedavg",
        )
        solver = solver or DEFAULTS.solver
        eigensolver = eigensolver or DEFAULTS.eigensolver
        rcond = DEFAULTS.rcond if rcond is None else rcond
        beta = DEFAULTS.beta if beta is None else beta
        gamma = DEFAULTS.gamma if gamma is None else gamma
        oversample = DEFAULTS.oversample if oversample is None else oversample
        power_iters = DEFAULTS.power_iters if power_iters is None else power_iters
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
        require(oversample >= 0, f"aggregator.oversample must be >= 0, got {oversample}")
        # q = 0 would take Rayleigh-Ritz on the random start block itself, never multiplied by H
        require(power_iters >= 1, f"aggregator.power_iters must be >= 1, got {power_iters}")
        require(sample_block >= 1, f"aggregator.sample_block must be >= 1, got {sample_block}")
        require(
            curvature_samples is None or curvature_samples >= 1,
            f"aggregator.curvature_samples must be >= 1 or null (all local data), got {curvature_samples}",
        )
        require(others in OTHERS, f"aggregator.others must be one of {', '.join(OTHERS)}, got {others!r}")
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
        self.mask = self.mask.to(global_params.device)  # the server's device (a no-op after the first round)
        self._global = global_params
        self._total = 0
        self._update_sum = torch.zeros_like(global_params)  # sum N_m Delta_m: FedAvg for unselected parameters
        self._eigenvectors: list[Tensor] = []
        self._eigenvalues: list[Tensor] = []
        self._counts: list[int] = []
        # sum N_m H_m Delta_m (low rank), or sum N_m d_m * Delta_m (diagonal)
        self._rhs = torch.zeros(int(self.mask.sum()), dtype=global_params.dtype, device=global_params.device)
        self._diag_sum = torch.zeros_like(self._rhs)  # sum N_m d_m (diagonal representation)
        self._in_subspace: list[float] = []

    def update(self, update: ClientUpdate) -> None:
        n = update.num_samples
        delta = update.delta if self.all_selected else update.delta[self.mask]
        self._total += n
        AF.accumulate_weighted(self._update_sum, update.delta, n)
        if self.representation == "diagonal":
            AF.accumulate_diagonal(self._rhs, self._diag_sum, delta, update.statistics["curvature_diagonal"], n)
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
        fedavg_step = AF.mean_from_sum(self._update_sum, self._total)
        new = self._global.clone()
        if self.representation == "diagonal":
            fallback = fedavg_step if self.all_selected else fedavg_step[self.mask]
            direction = AF.diagonal_solve(self._rhs, self._diag_sum, fallback, self.rcond)
        else:
            b = self._rhs / self._total
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
