"""FedFisher (Jhunjhunwala et al., 2024) as a multi-round baseline: Fisher-weighted averaging of the trained models.

The server minimises, over theta = theta_k + x,

    sum_m w_m (theta - theta_m)^T F_m (theta - theta_m) + damping ||theta - theta_avg||^2,   w_m = N_m / sum N,

with theta_m = theta_k + Delta_m the client's trained local model and F_m its Fisher (diagonal, or K-FAC) taken at
theta_m, i.e. at the END of local training (curvature_at=end). The damping term (ours, not the paper's) holds the
solution near the FedAvg average theta_avg along directions no client's Fisher sees, and makes the K-FAC system
positive definite. Default: the closed form x = (H + damping I)^-1 (b + damping g), H = sum w_m F_m,
b = sum w_m F_m Delta_m, g the FedAvg step (diagonal: elementwise; K-FAC: CG on Kronecker matvecs). The published
one-shot setting, Adam on the server for a fixed number of steps from the FedAvg average, is solver=adam.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fipa.aggregators import functional as AF
from fipa.aggregators.base import Aggregator
from fipa.aggregators.fipa import kfac_layout
from fipa.aggregators.kfac import KFAC_STATISTICS, KFACRound
from fipa.client import ClientCallback, ClientUpdate
from fipa.curvature.callback import CurvatureCallback
from fipa.curvature.ggn import ESTIMATORS
from fipa.errors import require
from fipa.parameters import FlatParameters

REPRESENTATIONS = ("diagonal", "kfac")
SOLVERS = ("closed_form", "adam")


def adam_minimise(
    gradient, start: Tensor, steps: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> Tensor:
    """`steps` Adam steps (Kingma & Ba, bias-corrected) on a function given by its gradient, from `start`."""
    x = start.clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, steps + 1):
        g = gradient(x)
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        x.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)
    return x


def fisher_objective_gradient(curvature_matvec, rhs: Tensor, damping: float, anchor: Tensor):
    """The gradient 2 (H x - b) + 2 damping (x - anchor) of FedFisher's objective (module docstring) in x."""
    return lambda x: 2 * (curvature_matvec(x) - rhs) + 2 * damping * (x - anchor)


class FedFisher(Aggregator):
    def __init__(
        self,
        representation: str = "diagonal",
        solver: str = "closed_form",
        damping: float | None = None,  # relative to nothing: an absolute weight on ||theta - theta_avg||^2
        server_steps: int | None = None,  # adam: number of steps (2000)
        server_lr: float | None = None,  # adam: learning rate (1e-2)
        step_size: float = 1.0,
        estimator: str = "ggn",
        sample_block: int = 256,
        curvature_samples: int | None = None,
        cg_tol: float = 1e-8,
        cg_max_iters: int = 1000,
        factor_rank: int | None = None,
        seed: int = 0,
    ):
        require(
            representation in REPRESENTATIONS,
            f"aggregator.representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}",
        )
        require(solver in SOLVERS, f"aggregator.solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if solver != "adam":
            unused = [name for name, value in (("server_steps", server_steps), ("server_lr", server_lr)) if value]
            require(
                not unused,
                f"aggregator.{' and aggregator.'.join(unused)} only apply to solver=adam; leave unset (null) "
                "with solver=closed_form",
            )
        damping = (1e-4 if representation == "kfac" else 0.0) if damping is None else float(damping)
        require(damping >= 0, f"aggregator.damping must be >= 0, got {damping}")
        require(
            damping > 0 or representation == "diagonal" or solver == "adam",
            "aggregator.damping must be > 0 for the K-FAC closed form (CG needs a positive definite system)",
        )
        server_steps = 2000 if server_steps is None else int(server_steps)
        server_lr = 1e-2 if server_lr is None else float(server_lr)
        require(server_steps >= 1, f"aggregator.server_steps must be >= 1, got {server_steps}")
        require(server_lr > 0, f"aggregator.server_lr must be > 0, got {server_lr}")
        require(step_size > 0, f"aggregator.step_size must be > 0, got {step_size}")
        require(
            estimator in ESTIMATORS, f"aggregator.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        )
        require(
            factor_rank is None or representation == "kfac",
            "aggregator.factor_rank applies to representation=kfac only; leave it unset (null)",
        )
        require(cg_tol > 0, f"aggregator.cg_tol must be > 0, got {cg_tol}")
        require(cg_max_iters >= 1, f"aggregator.cg_max_iters must be >= 1, got {cg_max_iters}")
        self.representation, self.solver, self.damping = representation, solver, damping
        self.server_steps, self.server_lr, self.step_size = server_steps, server_lr, float(step_size)
        self.cg_tol, self.cg_max_iters = float(cg_tol), int(cg_max_iters)
        self.required_statistics = KFAC_STATISTICS if representation == "kfac" else ("curvature_diagonal",)
        self.curvature = CurvatureCallback(
            rank=None,
            estimator=estimator,
            at="end",  # at the client's trained local model theta_m
            representation=representation,
            sample_block=sample_block,
            max_samples=curvature_samples,
            factor_rank=factor_rank,
            seed=seed,
        )

    def client_callbacks(self) -> list[ClientCallback]:
        return [self.curvature]

    def bind(self, flat: FlatParameters) -> None:
        if self.representation == "kfac":
            self._kfac = KFACRound(kfac_layout(flat, list(flat.names)), self.curvature.factor_rank)

    def reset(self, global_params: Tensor) -> None:
        self._global = global_params
        self._update_sum = torch.zeros_like(global_params)  # sum N_m Delta_m: the FedAvg step
        self._total = 0
        if self.representation == "kfac":
            self._kfac.reset(global_params.device)
        else:
            self._rhs = torch.zeros_like(global_params, dtype=torch.float64)  # sum N_m d_m Delta_m
            self._diag_sum = torch.zeros_like(self._rhs)  # sum N_m d_m

    def update(self, update: ClientUpdate) -> None:
        n = update.num_samples
        self._total += n
        AF.accumulate_weighted(self._update_sum, update.delta, n)
        if self.representation == "kfac":
            self._kfac.add(update.statistics, update.delta, n)
        else:
            diagonal = update.statistics["curvature_diagonal"].to(torch.float64)
            AF.accumulate_diagonal(self._rhs, self._diag_sum, update.delta.to(torch.float64), diagonal, n)

    def compute(self) -> Tensor:
        if self._total == 0:
            return self._global
        anchor = AF.mean_from_sum(self._update_sum, self._total).to(torch.float64)  # the FedAvg step
        if self.representation == "kfac":
            matvec, rhs = self._kfac.matvec, self._kfac.rhs()
        else:
            rhs, diagonal = self._rhs / self._total, self._diag_sum / self._total
            matvec = lambda x: diagonal * x
        if self.solver == "adam":
            gradient = fisher_objective_gradient(matvec, rhs, self.damping, anchor)
            direction = adam_minimise(gradient, anchor, self.server_steps, self.server_lr)
        elif self.representation == "kfac":
            direction = self._kfac.solve(self.damping, anchor, self.cg_tol, self.cg_max_iters)
        else:
            direction = AF.diagonal_fisher_solve(rhs, diagonal, anchor, self.damping)
        return self._global + self.step_size * direction.to(self._global.dtype)
