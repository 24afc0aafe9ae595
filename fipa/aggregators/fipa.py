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
from fipa.aggregators.kfac import KFAC_STATISTICS, KFACRound
from fipa.client import ClientCallback, ClientUpdate
from fipa.curvature.adaptive import kept_by_cutoff, relative_cutoff
from fipa.curvature.callback import CurvatureCallback
from fipa.curvature.eigen import effective_rank
from fipa.curvature.ggn import ESTIMATORS
from fipa.curvature.kfac import KFACLayout, kfac_layers
from fipa.errors import require
from fipa.parameters import FlatParameters

SOLVERS = ("pinv", "damped", "anchored")
DAMPING_RANGE = (1e-6, 1e4)  # bounds of the adaptive relative damping nu (mu = nu x the largest eigenvalue of H)
OTHERS = ("fedavg", "freeze")
REPRESENTATIONS = ("lowrank", "diagonal", "kfac")
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
    complement_step: float = 0.0
    damping: float = 1e-3  # anchored: mu relative to the largest eigenvalue of H
    max_local_epochs: int = 200  # adaptive_epochs: the authors' cap
    damping_factor: float = 3.0  # anchored, adaptive: nu x f after a round whose step raised the clients' loss, / f after one that lowered it
    damping_decay: float = 0.5  # anchored, with damping_start: nu x this after every round, down to `damping`
    cg_tol: float = 1e-8  # kfac: CG stops at ||residual|| <= cg_tol ||rhs|| (per layer)
    cg_max_iters: int = 1000  # kfac: CG's cap per layer (reported as the diagnostic cg_iterations)


DEFAULTS = ModeDefaults()


LM_SETTINGS = ("damping", "adaptive_damping", "damping_factor", "damping_start", "damping_decay", "anchor_step")
LOWRANK_SETTINGS = ("rank", "eigensolver", "oversample", "power_iters", "complement_step", "adaptive_cutoff",
                    "adaptive_epochs", "max_local_epochs")  # fmt: skip
KFAC_SETTINGS = ("cg_tol", "cg_max_iters", "factor_rank")


def _unused_settings(representation: str, solver: str | None, eigensolver: str | None, given: dict) -> dict[str, str]:
    """The settings given (not None) that the chosen mode does not use, each with the mode that leaves it unused."""
    unused: dict[str, str] = {}
    solver = solver or DEFAULTS.solver
    if representation != "kfac":
        unused.update(dict.fromkeys(KFAC_SETTINGS, f"representation={representation}"))
    if representation == "kfac":  # the damped solve only (a pinv of a sum of Kronecker products has no cheap form)
        for name in (*LOWRANK_SETTINGS, "rcond", *LM_SETTINGS):
            unused[name] = "representation=kfac"
    elif representation == "diagonal":
        for name in ("rank", "solver", "eigensolver", "oversample", "power_iters", "beta", "gamma",
                     "complement_step", "adaptive_cutoff", "adaptive_epochs", "max_local_epochs",
                     *LM_SETTINGS):  # fmt: skip
            unused[name] = "representation=diagonal"
    else:
        if given["adaptive_epochs"] is None:
            unused["max_local_epochs"] = "adaptive_epochs unset"
        if solver == "pinv":
            unused.update(beta="solver=pinv", gamma="solver=pinv")
        else:
            unused["rcond"] = f"solver={solver}"
        if solver == "anchored":  # the anchor already keeps every part of the FedAvg step the solve does not see
            unused.update(beta="solver=anchored", gamma="solver=anchored", complement_step="solver=anchored")
        else:
            unused.update(dict.fromkeys(LM_SETTINGS, f"solver={solver}"))
        if given["damping_start"] is None:
            unused.setdefault("damping_decay", "damping_start unset")
        if given["adaptive_damping"]:  # the LM rule moves the damping itself; damping_start is where it begins
            unused.setdefault("damping_decay", "adaptive_damping")
        if eigensolver == "exact":  # subspace iteration's settings; `auto` may choose it, so they stay usable there
            unused.update(oversample="eigensolver=exact", power_iters="eigensolver=exact")
    return {name: mode for name, mode in unused.items() if given[name] is not None}


def kfac_layout(flat: FlatParameters, names: list[str]) -> KFACLayout:
    """The K-FAC layout of the selected parameters `names` of `flat`'s module; a ConfigError when no Linear / Conv2d
    layer has its weight among them."""
    layers, _ = kfac_layers(flat.module, names)
    require(
        bool(layers),
        "representation=kfac needs a Linear or Conv2d (groups=1) layer whose weight is among the selected "
        f"parameters; selected: {', '.join(names)}",
    )
    shapes = dict(flat.module.named_parameters())
    return KFACLayout(layers, names, [shapes[name].shape for name in names])


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
        complement_step: float | None = None,  # pinv/damped: step along the FedAvg update outside the solve's span (0)
        damping: float | None = None,  # anchored: mu relative to the largest eigenvalue of H (1e-3)
        adaptive_damping: bool | None = None,  # anchored: Levenberg-Marquardt rule on the clients' losses (off)
        damping_factor: float | None = None,  # anchored, adaptive: the rule's factor (3)
        damping_start: float | None = None,  # anchored: the first round's relative damping (off: `damping` throughout)
        damping_decay: float | None = None,  # anchored, with damping_start: the damping's factor per round (0.5)
        anchor_step: float | None = None,  # anchored: the step of the part of the solve that comes from FedAvg's step
        adaptive_cutoff: float | None = None,  # the authors' per-client relative eigenvalue cut-off constant C (off)
        adaptive_epochs: float | None = None,  # the authors' adaptive local epochs: the constant C_tau (off)
        max_local_epochs: int | None = None,  # adaptive_epochs: the cap on a client's epochs (200)
        cg_tol: float | None = None,  # kfac: CG's relative residual tolerance (1e-8)
        cg_max_iters: int | None = None,  # kfac: CG's iteration cap per layer (1000)
        factor_rank: int | None = None,  # kfac: upload a large factor as this many eigenpairs (null: dense)
    ):
        require(
            representation in REPRESENTATIONS,
            f"aggregator.representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}",
        )
        given = {"complement_step": complement_step, "damping": damping, "damping_factor": damping_factor,
                 "damping_start": damping_start, "damping_decay": damping_decay, "anchor_step": anchor_step,
                 "adaptive_damping": adaptive_damping or None, "adaptive_cutoff": adaptive_cutoff,
                 "adaptive_epochs": adaptive_epochs, "max_local_epochs": max_local_epochs,
                 "rank": rank, "solver": solver, "rcond": rcond, "beta": beta, "gamma": gamma, "eigensolver": eigensolver,
                 "oversample": oversample, "power_iters": power_iters, "cg_tol": cg_tol,
                 "cg_max_iters": cg_max_iters, "factor_rank": factor_rank}  # fmt: skip
        unused = _unused_settings(representation, solver, eigensolver, given)
        require(
            not unused,
            "; ".join(f"aggregator.{name}={given[name]} has no effect with {mode}" for name, mode in unused.items())
            + ": leave it unset (null) or choose the mode that uses it"
            + (" (aggregator=fipa_diag is the diagonal with its settings)" if representation == "diagonal" else "")
            + (" (aggregator=fipa_kfac is K-FAC with its settings)" if representation == "kfac" else ""),
        )
        if representation == "kfac":
            require(
                solver in (None, "damped"),
                f"aggregator.solver={solver} is not available with representation=kfac: its server solve is the "
                "damped gamma * beta * (H + beta I)^-1 b (CG on Kronecker products); use solver=damped or null",
            )
            solver = "damped"
        cg_tol = DEFAULTS.cg_tol if cg_tol is None else cg_tol
        cg_max_iters = DEFAULTS.cg_max_iters if cg_max_iters is None else cg_max_iters
        require(cg_tol > 0, f"aggregator.cg_tol must be > 0, got {cg_tol}")
        require(cg_max_iters >= 1, f"aggregator.cg_max_iters must be >= 1, got {cg_max_iters}")
        self.cg_tol, self.cg_max_iters = float(cg_tol), int(cg_max_iters)
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
        complement_step = DEFAULTS.complement_step if complement_step is None else complement_step
        damping = DEFAULTS.damping if damping is None else damping
        damping_factor = DEFAULTS.damping_factor if damping_factor is None else damping_factor
        require(complement_step >= 0, f"aggregator.complement_step must be >= 0, got {complement_step}")
        lo, hi = DAMPING_RANGE
        require(lo <= damping <= hi, f"aggregator.damping must be in [{lo:g}, {hi:g}], got {damping}")
        require(damping_factor > 1, f"aggregator.damping_factor must be > 1, got {damping_factor}")
        damping_decay = DEFAULTS.damping_decay if damping_decay is None else damping_decay
        require(0 < damping_decay < 1, f"aggregator.damping_decay must be in (0, 1), got {damping_decay}")
        if damping_start is not None:
            require(
                damping <= damping_start <= hi,
                f"aggregator.damping_start must be in [damping={damping:g}, {hi:g}], got {damping_start}",
            )
        require(
            adaptive_cutoff is None or adaptive_cutoff > 0,
            f"aggregator.adaptive_cutoff must be > 0, got {adaptive_cutoff}",
        )
        max_local_epochs = DEFAULTS.max_local_epochs if max_local_epochs is None else max_local_epochs
        if adaptive_epochs is not None:
            require(adaptive_epochs > 0, f"aggregator.adaptive_epochs must be > 0, got {adaptive_epochs}")
            require(
                adaptive_cutoff is not None,
                "aggregator.adaptive_epochs needs aggregator.adaptive_cutoff: a client's epochs follow the smallest "
                "eigenvalue that cut-off keeps (FIPA_SPEC 7)",
            )
            require(
                curvature_at == "start",
                "aggregator.adaptive_epochs needs curvature_at=start: the epochs are chosen from the curvature at "
                "the broadcast point, before local training",
            )
            require(max_local_epochs >= 1, f"aggregator.max_local_epochs must be >= 1, got {max_local_epochs}")
        require(rank is None or rank >= 1, f"aggregator.rank must be >= 1 or null (full rank), got {rank}")
        require(step_size > 0, f"aggregator.step_size must be > 0, got {step_size}")
        require(anchor_step is None or anchor_step > 0, f"aggregator.anchor_step must be > 0, got {anchor_step}")
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
        # (H + mu I)^-1 (b + mu g) is taken whole with step_size, or, with anchor_step, as step_size x its curvature
        # part plus anchor_step x its FedAvg part: the anchor is scaled by anchor_step / step_size before the solve
        self.anchor_scale = None if anchor_step is None else float(anchor_step) / self.step_size
        self.solver = solver
        self.rcond, self.beta, self.gamma = float(rcond), float(beta), float(gamma)
        self.params = params
        self.others = others
        self.representation = representation
        self.complement_step = float(complement_step)
        self.damping, self.damping_factor = float(damping), float(damping_factor)
        self.adaptive_damping, self.adaptive_cutoff = bool(adaptive_damping), adaptive_cutoff
        probe = (*(("start_loss",) if self.adaptive_damping else ()), *(("gradient",) if adaptive_cutoff else ()))
        curvature = {"diagonal": ("curvature_diagonal",), "kfac": KFAC_STATISTICS}.get(
            representation, ("eigenvectors", "eigenvalues")
        )
        self.required_statistics = (*curvature, *probe)
        self.diagnostic_keys = () if representation == "diagonal" else ("cg_iterations",) if representation == "kfac" else (
            *DIAGNOSTICS,
            *(("complement_share",) if self.complement_step else ()),
            *(("damping",) if solver == "anchored" else ()),
            *(("step_rejected",) if self.adaptive_damping else ()),
            *(("cutoff_mean",) if adaptive_cutoff else ()),
            *(("local_epochs_mean",) if adaptive_epochs else ()),
        )  # fmt: skip
        self.adaptive_epochs = adaptive_epochs
        self._gradient_sum_norm: float | None = None  # last round's ||sum_m g_m||, told to the clients
        # the relative damping in force: it starts at damping_start and decays to `damping` (a continuation from
        # FedAvg's step), or is moved by the LM rule; saved with checkpoints
        self._nu = self.damping if damping_start is None else float(damping_start)
        self.damping_decay = float(damping_decay) if damping_start is not None and not adaptive_damping else None
        self._accepted: dict | None = None  # the trust region's last accepted point, its problem and its losses
        self._round = 0
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
            factor_rank=factor_rank,
            freeze_others=others == "freeze",
            seed=seed,
            probe=tuple(s for s in ("start_loss", "gradient") if s in probe),
            adaptive_epochs=None
            if adaptive_epochs is None
            else (float(adaptive_cutoff or 0.0), float(adaptive_epochs), int(max_local_epochs)),
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
        if self.representation == "kfac":
            self._kfac = KFACRound(kfac_layout(flat, names), self.curvature.factor_rank)

    # Streaming round --------------------------------------------------------------------------------------
    def begin_round(self, round_idx: int) -> None:
        self._round = round_idx

    def round_state(self) -> dict | None:
        # adaptive epochs: the clients' cut-off needs ||sum_m g_m||, known only once they have uploaded; they get the
        # last round's (None in the first: each then uses its own ||g_m||)
        return {"gradient_sum_norm": self._gradient_sum_norm} if self.adaptive_epochs else None

    def reset(self, global_params: Tensor) -> None:
        self.mask = self.mask.to(global_params.device)  # the server's device (a no-op after the first round)
        self._global = global_params
        self._total = 0
        self._update_sum = torch.zeros_like(global_params)  # sum N_m Delta_m: FedAvg for unselected parameters
        self._eigenvectors: list[Tensor] = []
        self._eigenvalues: list[Tensor] = []
        self._coefficients: list[Tensor] = []  # U_m^T Delta_m: what b needs once a client's factor is cut
        self._counts: list[int] = []
        # sum N_m H_m Delta_m (low rank), or sum N_m d_m * Delta_m (diagonal)
        self._rhs = torch.zeros(int(self.mask.sum()), dtype=global_params.dtype, device=global_params.device)
        self._diag_sum = torch.zeros_like(self._rhs)  # sum N_m d_m (diagonal representation)
        self._in_subspace: list[float] = []
        self._losses: dict[int, tuple[float, int]] = {}  # client -> (loss at this broadcast point, N_m)
        self._gradient_norms: list[float] = []
        self._gradient_sum = torch.zeros_like(self._rhs) if self.adaptive_cutoff else None
        self._extra: dict[str, float] = {}
        self._local_epochs: list[float] = []
        if self.representation == "kfac":
            self._kfac.reset(global_params.device)

    def update(self, update: ClientUpdate) -> None:
        n = update.num_samples
        delta = update.delta if self.all_selected else update.delta[self.mask]
        self._total += n
        AF.accumulate_weighted(self._update_sum, update.delta, n)
        if "local_epochs" in update.metrics:
            self._local_epochs.append(update.metrics["local_epochs"])
        if "start_loss" in update.statistics:
            self._losses[update.client_id] = (float(update.statistics["start_loss"]), n)
        if self.representation == "diagonal":
            AF.accumulate_diagonal(self._rhs, self._diag_sum, delta, update.statistics["curvature_diagonal"], n)
            return
        if self.representation == "kfac":
            self._kfac.add(update.statistics, delta, n)
            return
        U, lam = update.statistics["eigenvectors"], update.statistics["eigenvalues"]
        coefficients = U.T @ delta
        if self._gradient_sum is None:  # b streams; with the adaptive cut-off it is formed after the cut
            self._rhs += AF.factor_rhs(U, lam, n, delta)
        else:
            gradient = update.statistics["gradient"]
            self._gradient_sum += gradient
            self._gradient_norms.append(float(gradient.norm()))
            self._coefficients.append(coefficients)
        self._eigenvectors.append(U)
        self._eigenvalues.append(lam)
        self._counts.append(n)
        # the share of the update inside the client's Fisher subspace (diagnostic)
        self._in_subspace.append(float(coefficients.square().sum() / delta.square().sum().clamp_min(1e-300)))

    def compute(self) -> Tensor:
        if self._total == 0:
            return self._global
        base, fedavg_step = self._global, AF.mean_from_sum(self._update_sum, self._total)
        fedavg_selected = fedavg_step if self.all_selected else fedavg_step[self.mask]
        extra = None  # the complement step, taken with its own step size
        if self.representation == "diagonal":
            direction = AF.diagonal_solve(self._rhs, self._diag_sum, fedavg_selected, self.rcond)
        elif self.representation == "kfac":  # the damped form gamma * beta * (H + beta I)^-1 b, H block diagonal
            solved = self._kfac.solve(self.beta, None, self.cg_tol, self.cg_max_iters)
            direction = (self.gamma * self.beta * solved).to(fedavg_selected.dtype)
        elif self.solver == "anchored" and self.adaptive_damping:
            base, direction, fedavg_step = self._trust_region_step(fedavg_step)
        else:
            direction, extra = self._lowrank_direction(fedavg_selected)
        new = base.clone()
        if self.all_selected:
            new.add_(direction, alpha=self.step_size)
            return new if extra is None else new.add_(extra)
        new[self.mask] += self.step_size * direction if extra is None else self.step_size * direction + extra
        if self.others == "fedavg":
            new[~self.mask] += fedavg_step[~self.mask]
        return new

    def _factor_and_rhs(self) -> tuple[Tensor, Tensor]:
        """F (the stacked scaled factors, column-major) and b of this round, after the adaptive cut if any."""
        if self.adaptive_cutoff:
            self._cut_by_gradient_norms()
        weights = [n / self._total for n in self._counts]
        return AF.stack_scaled_factors(self._eigenvectors, self._eigenvalues, weights), self._rhs / self._total

    def _lowrank_direction(self, fedavg_step: Tensor) -> tuple[Tensor, Tensor | None]:
        """solve(H, b) by the chosen solver, and the complement step when asked for."""
        F, b = self._factor_and_rhs()
        if self.solver == "anchored":
            self._extra["damping"] = nu = self._nu
            if self.damping_decay is not None:
                self._nu = max(self.damping, nu * self.damping_decay)
            anchor = fedavg_step if self.anchor_scale is None else self.anchor_scale * fedavg_step
            return AF.lowrank_anchored_solve(F, b, anchor, nu, relative=True, overwrite_factor=True), None
        if not self.complement_step:
            if self.solver == "pinv":
                return AF.lowrank_pinv_solve(F, b, self.rcond, overwrite_factor=True), None
            return AF.lowrank_damped_solve(F, b, self.beta, self.gamma, overwrite_factor=True), None
        if self.solver == "pinv":
            solved, complement = AF.lowrank_pinv_solve_with_complement(F, b, fedavg_step, self.rcond)
        else:
            complement = AF.subspace_complement(F.clone(), fedavg_step)
            solved = AF.lowrank_damped_solve(F, b, self.beta, self.gamma, overwrite_factor=True)
        extra = self.complement_step * complement
        total = (self.step_size * solved + extra).norm().clamp_min(1e-300)
        self._extra["complement_share"] = float(extra.norm() / total)
        return solved, extra

    def _trust_region_step(self, fedavg_step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Levenberg-Marquardt with step rejection on the clients' losses at the broadcast points.

        The broadcast point of this round was last round's step. If the clients' loss there (over the clients that
        reported at both points) is not above the loss at the last accepted point, the step is accepted: this round
        becomes the accepted point and the damping falls by damping_factor. Otherwise it is rejected: the server
        returns to the accepted point and solves that round's problem again with damping_factor times more damping
        (this round's updates, trained from the rejected point, are not used). So the clients' loss at accepted
        points never rises. Returns (base point, anchored direction on the selected parameters, FedAvg step).
        """
        lo, hi = DAMPING_RANGE
        accepted = self._accepted
        if accepted is None or self._not_worse(accepted["losses"]):
            F, b = self._factor_and_rhs()
            if accepted is not None:
                self._nu = max(self._nu / self.damping_factor, lo)
            fedavg_selected = fedavg_step if self.all_selected else fedavg_step[self.mask]
            accepted = self._accepted = {
                "params": self._global, "F": F, "b": b, "fedavg": fedavg_step, "fedavg_selected": fedavg_selected,
                "losses": {c: loss for c, (loss, _) in self._losses.items()},
            }  # fmt: skip
            self._extra["step_rejected"] = 0.0
        else:
            self._nu = min(self._nu * self.damping_factor, hi)
            self._extra["step_rejected"] = 1.0
        self._extra["damping"] = self._nu
        anchor = accepted["fedavg_selected"]
        direction = AF.lowrank_anchored_solve(
            accepted["F"].clone(), accepted["b"], anchor if self.anchor_scale is None else self.anchor_scale * anchor,
            self._nu, relative=True, overwrite_factor=True,
        )  # fmt: skip
        return accepted["params"], direction, accepted["fedavg"]

    def _not_worse(self, before: dict[int, float]) -> bool:
        """The clients' mean loss now (weighted by N_m) against `before`, over the clients that reported both;
        True when no client reported both (nothing to judge by)."""
        common = self._losses.keys() & before.keys()
        if not common:
            return True
        total = sum(self._losses[c][1] for c in common)
        now = sum(self._losses[c][0] * self._losses[c][1] for c in common) / total
        return now <= sum(before[c] * self._losses[c][1] for c in common) / total

    def _cut_by_gradient_norms(self) -> None:
        """The authors' adaptive variant (FIPA_SPEC 7): client m keeps its eigenpairs with lambda > thr_m lambda_max,
        thr_m = clip(C / (k (||g_m|| + ||sum_m g_m|| + 1e-12)), 0, 0.99) at round k; b is formed from the kept parts."""
        assert self._gradient_sum is not None and self.adaptive_cutoff is not None
        total_norm = float(self._gradient_sum.norm())
        self._gradient_sum_norm = total_norm
        cutoffs = []
        for m, (U, lam, c, n) in enumerate(
            zip(self._eigenvectors, self._eigenvalues, self._coefficients, self._counts)
        ):
            threshold = relative_cutoff(self.adaptive_cutoff, self._round, self._gradient_norms[m], total_norm)
            keep = kept_by_cutoff(lam, threshold)
            self._eigenvectors[m], self._eigenvalues[m] = U[:, keep], lam[keep]
            self._rhs += U[:, keep] @ (c[keep] * lam[keep] * n)
            cutoffs.append(threshold)
        self._extra["cutoff_mean"] = sum(cutoffs) / len(cutoffs)

    def state_dict(self) -> dict:
        accepted = None if self._accepted is None else {**self._accepted, "F": self._accepted["F"].contiguous()}
        return {"damping": self._nu, "accepted": accepted, "gradient_sum_norm": self._gradient_sum_norm}

    def load_state_dict(self, state: dict) -> None:
        self._nu = float(state.get("damping", self.damping))
        self._gradient_sum_norm = state.get("gradient_sum_norm")
        accepted = state.get("accepted")
        if accepted is not None:  # the solves factorise F in place: keep it column-major, as stack_scaled_factors does
            accepted = {**accepted, "F": accepted["F"].T.contiguous().T, "losses": dict(accepted["losses"])}
        self._accepted = accepted

    def diagnostics(self) -> dict[str, float]:
        if self.representation == "diagonal":
            return {}
        if self.representation == "kfac":
            return {"cg_iterations": float(self._kfac.iterations)}
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
            **{key: self._extra.get(key, float("nan")) for key in self.diagnostic_keys if key not in DIAGNOSTICS},
            **({"local_epochs_mean": sum(self._local_epochs) / len(self._local_epochs)} if self._local_epochs else {}),
        }
