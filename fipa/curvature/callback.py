"""FIPA's client half: a Lightning callback that measures the client's curvature and hands it to the server."""

from __future__ import annotations

import logging
import math
import time

import torch
from lightning import LightningModule, Trainer
from torch import Tensor

from fipa.client import ClientCallback, client_model, set_local_epochs
from fipa.curvature.adaptive import adaptive_local_epochs, kept_by_cutoff, relative_cutoff
from fipa.curvature.eigen import LowRankCurvature, randomized_eigenpairs, top_eigenpairs_from_rows
from fipa.curvature.ggn import curvature_diagonal, curvature_matvec, factor_rows, subsample_groups
from fipa.curvature.kfac import group_norms, kfac_curvature, kfac_layers, pack
from fipa.errors import require
from fipa.seeding import CURVATURE, torch_generator

log = logging.getLogger(__name__)

# Building the Jacobian rows B once and iterating on B^T (B V) beats (q + 1)(r + s) matrix-free jvp/vjp passes
# over the data (about 5x on a 55k-parameter CNN) as long as B fits in memory; beyond this the matrix-free
# route keeps memory at one chunk of samples.
ROWS_MAX_BYTES = 2 * 2**30
EXACT_MAX_DIM = 5_000  # a dense eigh of this size already takes seconds


def rows_budget(device: torch.device) -> int:
    """Bytes the explicit Jacobian rows may take on `device`: ROWS_MAX_BYTES of host memory on the CPU; on a GPU a
    quarter of its free memory (the rows share it with their products and the model's activations)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return ROWS_MAX_BYTES


def choose_eigensolver(
    num_rows: int,
    num_params: int,
    rank: int | None,
    oversample: int,
    element_size: int = 8,
    max_bytes: int = ROWS_MAX_BYTES,
) -> str:
    """`exact` for full rank or small problems, `rows` (subspace iteration on explicit rows) when r + s is far
    below the rows' dimensions, `randomized` (matrix-free) when the rows would not fit in `max_bytes`."""
    if rank is None:
        return "exact"
    if num_rows * num_params * element_size > max_bytes:
        return "randomized"
    # A dense eigh costs O(min(m, p)^3); subspace iteration on B costs O(m p (r + s)) per pass.
    small_target = 4 * (rank + oversample) < min(num_rows, num_params)
    return "rows" if small_target or min(num_rows, num_params) > EXACT_MAX_DIM else "exact"


def merge_average(
    running: LowRankCurvature | None, new: LowRankCurvature, count: int, rank: int | None
) -> LowRankCurvature:
    """Running mean of low-rank curvatures: ((count-1) H_running + H_new) / count, re-truncated to `rank`."""
    if running is None:
        return new
    columns = torch.cat(
        [
            running.eigenvectors * (running.eigenvalues * (count - 1) / count).sqrt(),
            new.eigenvectors * (new.eigenvalues / count).sqrt(),
        ],
        dim=1,
    )
    return top_eigenpairs_from_rows(columns.T, rank)


class CurvatureCallback(ClientCallback):
    """Gathers the client's GGN (or a cheaper Fisher estimate) with Lightning hooks.

    `at="start"`: once at the broadcast point, in `on_train_start`, before any local step (the paper).
    `at="epoch_end"`: after every local epoch, averaged over the epochs.
    `at="end"`: once at the client's trained local model, in `on_train_end` (FedFisher).
    The result is uploaded as low-rank factors (eigenvectors, eigenvalues), for `representation="diagonal"` as the
    curvature diagonal, and for `representation="kfac"` as the packed K-FAC factors of the Linear / Conv2d layers
    with the diagonal of the other parameters (fipa.curvature.kfac; epoch averages average the factors).
    """

    def __init__(
        self,
        rank: int | None = 20,
        estimator: str = "ggn",
        at: str = "start",
        eigensolver: str = "auto",
        representation: str = "lowrank",
        oversample: int = 10,
        power_iters: int = 2,
        sample_block: int = 256,
        max_samples: int | None = None,
        factor_rank: int | None = None,
        freeze_others: bool = False,
        seed: int = 0,
        probe: tuple[str, ...] = (),
        adaptive_epochs: tuple[float, float, int] | None = None,
    ):
        self.rank = rank
        self.estimator = estimator
        self.at = at
        self.eigensolver = eigensolver
        self.representation = representation
        self.oversample = oversample
        self.power_iters = power_iters
        self.sample_block = sample_block
        self.max_samples = max_samples
        require(
            factor_rank is None or factor_rank >= 1, f"aggregator.factor_rank must be >= 1 or null, got {factor_rank}"
        )
        self.factor_rank = factor_rank  # kfac: large factors travel as this many eigenpairs (fipa.curvature.kfac.pack)
        self.param_names: list[str] | None = None  # set by the aggregator's bind(); None: all parameters
        self.freeze_others = freeze_others
        self.seed = seed
        # what else the server asks about the broadcast point: "start_loss" (the client's loss on its data) and
        # "gradient" (that loss's gradient w.r.t. the selected parameters, J^T r / N for MSE)
        self.probe = tuple(probe)
        # the authors' adaptive local epochs (FIPA_SPEC 7): (cut-off constant C, epochs constant C_tau, cap); the
        # epochs are chosen at the broadcast point from the curvature and the gradient there (probed)
        self.adaptive_epochs = adaptive_epochs
        if adaptive_epochs is not None:
            require(at == "start", "adaptive local epochs need the curvature at the broadcast point (at='start')")
            self.probe = tuple(dict.fromkeys((*self.probe, "gradient")))
        self._round_state: dict | None = None
        self._local_epochs: int | None = None
        self._warned_rank = False
        self._reset()

    def _reset(self) -> None:
        self._lowrank: LowRankCurvature | None = None
        self._diagonal: Tensor | None = None
        self._kfac: dict[str, Tensor] | None = None
        self._count = 0
        self._seconds = 0.0
        self._frozen: list[torch.nn.Parameter] = []
        self._probed: dict[str, Tensor] = {}

    @property
    def needs_epochs(self) -> bool:
        return self.at == "epoch_end"  # at the broadcast point, nothing happens per epoch

    def begin_client(self, client_id: int, round_state, client_state) -> None:
        self._round_state = round_state  # FIPA.round_state: last round's ||sum_m g_m|| for the adaptive epochs

    # Lightning hooks ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        if self.freeze_others:
            selected = set(self._selected_names(pl_module))
            self._frozen = [
                p for n, p in client_model(pl_module).named_parameters() if n not in selected and p.requires_grad
            ]
            for p in self._frozen:
                p.requires_grad_(False)
        if self.probe:
            self._probe(pl_module)
        if self.at == "start":
            self._measure(pl_module)
        if self.adaptive_epochs is not None:
            self._choose_local_epochs(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at == "epoch_end":
            self._measure(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at == "end":  # at the trained local model, before the frozen parameters thaw
            self._measure(pl_module)
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    # What the client uploads ------------------------------------------------------------------------------
    def client_statistics(self) -> dict[str, Tensor]:
        if self.representation == "diagonal":
            curvature = {} if self._diagonal is None else {"curvature_diagonal": self._diagonal}
        elif self.representation == "kfac":
            curvature = dict(self._kfac or {})
        elif self._lowrank is None:
            curvature = {}
        else:
            curvature = {"eigenvectors": self._lowrank.eigenvectors, "eigenvalues": self._lowrank.eigenvalues}
        return {**curvature, **self._probed}

    def client_metrics(self) -> dict[str, float]:
        metrics = {"curvature_s": self._seconds}
        if self._lowrank is not None:
            metrics["curvature_rank"] = float(self._lowrank.rank)
        if self._local_epochs is not None:
            metrics["local_epochs"] = float(self._local_epochs)
        return metrics

    def _choose_local_epochs(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """tau_m from the client's kept spectrum and gradient norm (fipa.curvature.adaptive), set for this fit."""
        assert self.adaptive_epochs is not None and self._lowrank is not None
        cutoff_coef, epochs_coef, cap = self.adaptive_epochs
        round_idx = getattr(pl_module, "round_idx", 1)
        gradient_norm = float(self._probed["gradient"].norm())
        total_norm = (self._round_state or {}).get("gradient_sum_norm")
        cutoff = relative_cutoff(
            cutoff_coef, round_idx, gradient_norm, gradient_norm if total_norm is None else total_norm
        )
        eigenvalues = self._lowrank.eigenvalues
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._local_epochs = adaptive_local_epochs(
            eigenvalues[kept_by_cutoff(eigenvalues, cutoff)], gradient_norm, round_idx, lr, epochs_coef, cap
        )
        set_local_epochs(trainer, pl_module, self._local_epochs)

    # The measurement ------------------------------------------------------------------------------------
    def _selected_names(self, pl_module) -> list[str]:
        names = [n for n, _ in client_model(pl_module).named_parameters()]
        return names if self.param_names is None else [n for n in names if n in set(self.param_names)]

    def _probe(self, pl_module) -> None:
        """The client's loss on its local data at the broadcast point (eval mode, no augmentation) and, if asked,
        its gradient w.r.t. the selected parameters: one forward and one backward pass."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            selected = set(self._selected_names(pl_module))
            params = [p for n, p in client_model(pl_module).named_parameters() if n in selected]
            with torch.enable_grad():
                loss = pl_module.data_loss(pl_module.local_data)
                self._probed = {"start_loss": loss.detach().reshape(1)} if "start_loss" in self.probe else {}
                if "gradient" in self.probe:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    flat = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
                    self._probed["gradient"] = torch.cat([g.reshape(-1) for g in flat])
        finally:
            pl_module.train(was_training)

    def _measure(self, pl_module) -> None:
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()  # eval mode, no augmentation: the curvature of the model as broadcast
        try:
            selected = set(self._selected_names(pl_module))
            params = {n: p.detach() for n, p in client_model(pl_module).named_parameters() if n in selected}
            self._count += 1
            generator = torch_generator(
                self.seed,
                CURVATURE,
                getattr(pl_module, "round_idx", 0),
                getattr(pl_module, "client_id", 0),
                self._count,
            )
            groups = subsample_groups(pl_module.curvature_groups(pl_module.local_data), self.max_samples, generator)
            if self.representation == "diagonal":
                if getattr(pl_module, "curvature_outputs_are_model_outputs", False):
                    diagonal = self._layered_diagonal(client_model(pl_module), params, groups, generator)
                else:  # e.g. PINN residuals: only per-sample Jacobians see them
                    diagonal = curvature_diagonal(params, groups, self.estimator, generator, self.sample_block)
                if self._diagonal is None:
                    self._diagonal = diagonal
                else:
                    self._diagonal += (diagonal - self._diagonal) / self._count
            elif self.representation == "kfac":
                factors = self._kfac_curvature(pl_module, params, groups, generator)
                if self._kfac is None:
                    self._kfac = factors
                else:
                    for kind, value in factors.items():
                        self._kfac[kind] += (value - self._kfac[kind]) / self._count
            else:
                self._lowrank = merge_average(
                    self._lowrank, self._lowrank_curvature(params, groups, generator), self._count, self.rank
                )
        finally:
            pl_module.train(was_training)
            self._seconds += time.perf_counter() - start

    def _kfac_curvature(self, pl_module, params, groups, generator) -> dict[str, Tensor]:
        """The packed K-FAC factors of the selected Linear / Conv2d layers and the diagonal of the other selected
        parameters, from the same curvature groups (and, for mc, the same sample)."""
        require(
            getattr(pl_module, "curvature_outputs_are_model_outputs", False),
            f"representation=kfac needs a task whose curvature outputs are the model's own outputs (regression, "
            f"image classification); {type(pl_module).__name__}'s are not (e.g. PINN residuals): use "
            "representation=lowrank or diagonal",
        )
        factors, diagonals, rest = self._backward_pass_curvature(
            client_model(pl_module), params, groups, generator, True
        )
        ref = next(iter(params.values()))
        diagonal = torch.cat([diagonals[name].reshape(-1) for name in rest]) if rest else ref.new_zeros(0)
        return {
            "kfac_input_factors": pack([A for A, _ in factors], self.factor_rank, generator),
            "kfac_output_factors": pack([G for _, G in factors], self.factor_rank, generator),
            "curvature_diagonal": diagonal,
        }

    def _layered_diagonal(self, model, params, groups, generator) -> Tensor:
        """The exact GGN diagonal of `params`, in their order (`_backward_pass_curvature` without factors)."""
        _, diagonals, _ = self._backward_pass_curvature(model, params, groups, generator, False)
        return torch.cat([diagonals[name].reshape(-1) for name in params])

    def _backward_pass_curvature(self, model, params, groups, generator, factored: bool):
        """One backward pass per factor column (`kfac_curvature`): the Linear / Conv2d layers' K-FAC factors if
        `factored`, else their exact diagonal; GroupNorm's exact diagonal; per-sample Jacobians (same groups, and
        for mc the same sample) for any other parameter (e.g. LayerNorm, grouped convolutions). Returns the
        factors, the diagonals by parameter name, and the names the factored layers leave to the diagonal."""
        layers, rest = kfac_layers(model, list(params))
        norms = group_norms(model, rest)
        factors, diagonals = kfac_curvature(
            model, layers if factored else [], groups, self.estimator, generator, self.sample_block, norms,
            [] if factored else layers,
        )  # fmt: skip
        others = {name: params[name] for name in rest if name not in diagonals}
        if others:
            flat = curvature_diagonal(others, groups, self.estimator, generator, self.sample_block).detach()
            diagonals.update(zip(others, flat.split([p.numel() for p in others.values()])))
        return factors, diagonals, rest

    def _lowrank_curvature(self, params, groups, generator) -> LowRankCurvature:
        num_params = sum(p.numel() for p in params.values())
        rank = self.rank
        if rank is not None and rank >= num_params:
            if not self._warned_rank:
                log.warning(
                    "aggregator.rank=%d >= number of curvature parameters %d: clamped to %d",
                    rank,
                    num_params,
                    num_params,
                )
                self._warned_rank = True
            rank = num_params
        rows_per_sample = 1 if self.estimator != "ggn" else None
        num_rows = sum(len(g.inputs) * (rows_per_sample or _num_outputs(g, params)) for g in groups)
        dtype = next(iter(params.values())).dtype
        solver = self.eigensolver
        if solver == "auto":
            device = next(iter(params.values())).device
            solver = choose_eigensolver(
                num_rows, num_params, rank, self.oversample, dtype.itemsize, rows_budget(device)
            )
        if solver == "randomized":
            matvec = lambda V: curvature_matvec(params, groups, V, self.estimator, generator, self.sample_block)
        else:
            rows = factor_rows(params, groups, self.estimator, generator, self.sample_block)
            if solver == "exact":
                return top_eigenpairs_from_rows(rows, rank)
            matvec = lambda V: rows.T @ (rows @ V)
        assert rank is not None  # full rank always takes the exact route (choose_eigensolver, FIPA's checks)
        device = next(iter(params.values())).device
        return randomized_eigenpairs(
            matvec, num_params, rank, self.oversample, self.power_iters, generator, dtype, device=device
        )


def _num_outputs(group, params) -> int:
    """Output size C of a group's per-sample function (one forward pass on the first sample)."""
    with torch.no_grad():
        return int(math.prod(group.output_fn(params, group.inputs[0]).shape) or 1)
