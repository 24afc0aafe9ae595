"""The client side: a LightningModule trained locally by Lightning, and what it sends back."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn

from fipa.local_steps import CompiledSteps, EagerSteps, overrides
from fipa.parameters import FlatParameters

log = logging.getLogger(__name__)

# `import lightning` sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (to keep CUDA uninitialised before forking); then every
# optimizer step asks NVML for devices and, on a machine without a GPU, fails to load libnvidia-ml each time
# (~0.14 ms per step, 7-11% of a regression step). fipa's worker processes (Ray, joblib) are spawned, not forked
# from a CUDA-using parent, so the check buys nothing here.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

# Lightning announces devices, tips and "fit stopped" at INFO on every local fit: thousands of lines per run.
for _name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass
class ClientUpdate:
    """What one client uploads after a round: the parameter delta, its sample count and callback statistics."""

    client_id: int
    num_samples: int
    delta: Tensor
    statistics: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    wire_bytes: dict[str, int] | None = None  # bytes by kind as received over a network (fipa.flower), if so

    def payload_bytes(self) -> dict[str, int]:
        """Bytes uploaded by kind: the update itself and each statistic tensor (eigenvectors, eigenvalues, ...)."""
        if self.wire_bytes is not None:
            return dict(self.wire_bytes)
        sizes = {"update": _nbytes(self.delta)}
        sizes.update({kind: _nbytes(value) for kind, value in self.statistics.items()})
        return sizes

    def is_finite(self) -> bool:
        tensors = [self.delta, *self.statistics.values()]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def to(self, device: torch.device | str) -> ClientUpdate:
        """The same upload with its tensors on `device` (e.g. off a GPU worker, onto the server's device)."""
        stats = {kind: value.to(device) for kind, value in self.statistics.items()}
        wire = None if self.wire_bytes is None else dict(self.wire_bytes)
        return ClientUpdate(self.client_id, self.num_samples, self.delta.to(device), stats, dict(self.metrics), wire)


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ClientCallback(L.Callback):
    """A Lightning callback that forms part of a method's client half (an aggregator's or a client method's).

    Besides the usual hooks it may hand statistics to the server (e.g. curvature factors) and report
    per-client metrics; both are collected by the `LocalTrainer` after every local fit.
    """

    def validate(self, model: nn.Module) -> None:
        """Raise ConfigError if this method cannot train `model` (called once when the run is built, so that the
        error stops the run before any training instead of failing every client)."""

    def client_statistics(self) -> dict[str, Tensor]:
        return {}

    def client_metrics(self) -> dict[str, float]:
        return {}

    @property
    def needs_epochs(self) -> bool:
        """Whether local training must run every epoch as a real Lightning epoch for this callback. A full-batch
        fit otherwise runs its epochs as updates inside one Lightning step (see `LocalTrainer`). By default, a
        callback that overrides an epoch or batch hook needs them; override when the hook acts only sometimes."""
        return needs_epochs(self)

    # Client methods with state that outlives a round (SCAFFOLD's controls, MOON's previous models) split it
    # into a server side, kept by the FederatedTrainer's process, and a worker side that trains one client
    # from state shipped with the job. That is what lets a client train in any process (executor=ray) and
    # what checkpoints save. Stateless callbacks ignore all of it.

    # server side
    def on_round_start(self, round_idx: int, num_clients: int) -> None:
        """Before the round's clients train (e.g. apply last round's control-variate sum)."""

    def round_state(self) -> Any:
        """What every client of this round needs (e.g. SCAFFOLD's server control)."""
        return None

    def client_state(self, client_id: int) -> Any:
        """What this client kept from its last round (e.g. its control variate); None if it never trained."""
        return None

    # Where a client's state lives: in a simulation the server keeps it and ships it with every job; on a device
    # (fipa.flower) it stays on the client, and the server half sees `state=None` unless it needs the state itself.
    server_keeps_client_state = False

    def on_client_result(self, client_id: int, update: ClientUpdate, state: Any) -> None:
        """A surviving client's update and the state its worker returned from `end_client` (None where the state
        stays on the client, see `server_keeps_client_state`)."""

    def on_round_end(self, params: Tensor) -> Tensor:
        """The round's new global model (after the aggregator and the server optimizer), which a method may
        correct (FedDyn subtracts h / alpha); called only in rounds where a client's update arrived."""
        return params

    # worker side
    def begin_client(self, client_id: int, round_state: Any, client_state: Any) -> None:
        """Before one client's local fit: the state the server side shipped with the job."""

    def end_client(self) -> Any:
        """After the local fit: the client's new state, handed to `on_client_result`."""
        return None


def client_model(pl_module: L.LightningModule) -> nn.Module:
    """The network a client module trains (its `model`), as the callbacks' hooks, typed for LightningModule, see it."""
    return cast(nn.Module, pl_module.model)


EPOCH_HOOKS = ("on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end")


def needs_epochs(callback: L.Callback) -> bool:
    """A callback that acts per epoch or per batch needs real epochs (see ClientCallback.needs_epochs)."""
    if isinstance(callback, ClientCallback) and type(callback).needs_epochs is not ClientCallback.needs_epochs:
        return callback.needs_epochs
    return any(overrides(callback, hook) for hook in EPOCH_HOOKS)


class ClientModule(L.LightningModule):
    """Base class of a federated client's local model.

    Subclasses implement `training_loss(batch)` and, for curvature-based aggregation, `curvature_groups` (the
    per-sample output functions whose GGN the client shares). The base `training_step` takes `steps_per_batch`
    optimizer updates on its batch (tau for a full-batch fit whose epochs run inside one Lightning step, else 1)
    through `fipa.local_steps`: eagerly, with every per-update callback hook, or compiled (`compile_steps=True`). A
    subclass may instead write its own `training_step` returning the loss: it then gets Lightning's automatic
    optimization, one update per batch. `optimizer` is a callable taking the parameters (a Hydra `_partial_`
    optimizer); it is rebuilt at every local fit, so the optimizer state starts fresh each round, as the paper does.
    """

    #: Whether `curvature_groups`' output functions are the model itself applied to one sample, so that curvature may
    #: run the model batched with layer hooks (K-FAC); False for, e.g., PINN residuals built from input derivatives.
    curvature_outputs_are_model_outputs = False

    def __init__(self, model: nn.Module, optimizer):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.lr_scale = 1.0  # set per round by a schedule (e.g. the 0.1 client lr multiplier of a FIPA phase)
        # Set by the FederatedTrainer before each local fit: the client's data and where in the run we are.
        self.local_data: Any = None
        self.client_id = 0
        self.round_idx = 0
        self.num_clients = 1
        # The job's own random stream, drawn from (seed, round, client) by the runner: augmentation and any other
        # training-time randomness use it, so a client trains the same in any process and after a resume.
        self.generator: torch.Generator | None = None
        self.last_train_loss: Tensor | float = float("nan")
        self.automatic_optimization = type(self).training_step is not ClientModule.training_step
        self.steps_per_batch = 1  # set by the LocalTrainer for each fit
        self.epochs_fused = False  # whether this fit runs its epochs as updates of one step (set by the LocalTrainer)
        self.compile_steps = False  # trainer.compile: compiled local updates (fipa.local_steps.CompiledSteps)
        self._steps: EagerSteps | None = None
        self._compiled: dict[tuple, CompiledSteps] = {}  # kept across fits: a new round reuses the graphs
        self._compiled_now: CompiledSteps

    # Lightning sets `_current_fx_name` twice per hook call; nn.Module.__setattr__ makes that ~0.1 ms per step
    # on small models, so this attribute (never a tensor or module) bypasses it.
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_loss(self, batch) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define training_loss(batch) or training_step")

    def data_loss(self, data: Any) -> Tensor:
        """The training objective on the client's whole local data set, without any training-time randomness
        (what the server may ask about the broadcast point). Full-batch tasks: `training_loss` of the full batch."""
        return self.training_loss(data[slice(None)])

    def on_train_start(self) -> None:
        self._steps = None  # the optimizer is new at every fit: the steppers start at its first step

    def training_step(self, batch, batch_idx):
        if self._steps is None:
            self._steps = EagerSteps(self, self.training_loss)
            if self.compile_steps:
                optimizer = self._steps.optimizer
                key = CompiledSteps.key_of(self.model, optimizer)
                if key not in self._compiled:
                    self._compiled[key] = CompiledSteps(self, self.training_loss, optimizer)
                self._compiled_now = self._compiled[key]
                self._compiled_now.begin_fit(optimizer)  # fresh optimizer state, this round's lr
        if self.compile_steps:
            steps = self._compiled_now
            self.last_train_loss = steps.run(batch, self.steps_per_batch, self._steps.optimizer, self._steps.hooks)
        else:
            self.last_train_loss = self._steps.run(batch, self.steps_per_batch)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= self.lr_scale
        return optimizer

    def curvature_groups(self, data: Any) -> list:
        """Per-sample output functions and inputs for the GGN (see fipa.curvature.CurvatureGroup)."""
        raise NotImplementedError(f"{type(self).__name__} does not define curvature_groups; FIPA needs it")


@dataclass
class TrainerSettings:
    """How clients train locally (`trainer.*` in the config, with Lightning's names)."""

    accelerator: str = "cpu"  # cpu | gpu | auto
    precision: str | None = None  # a Lightning precision, e.g. "bf16-mixed"; None: the model's own dtype
    compile: bool = False  # compiled local updates (fipa.local_steps.CompiledSteps)


class _StayOnDevice(SingleDeviceStrategy):
    """Lightning's single-device strategy without the move back to the CPU after every fit: a client module lives on
    its device for the whole run, with the data, so a fit costs no transfers."""

    def teardown(self) -> None:
        module = self.lightning_module
        self._lightning_module = None  # the base teardown would call module.cpu()
        try:
            super().teardown()
        finally:
            self._lightning_module = module


class LocalTrainer:
    """Runs Lightning's fit loop for one client after another with one reused `Trainer`.

    A fresh `Trainer` per local fit costs ~7 ms; reusing one only needs `fit_loop.max_epochs` raised, because
    a second `fit` would otherwise see its epoch budget already spent and train nothing.

    A full-batch, unshuffled loader sees the same batch in every epoch, so when no callback needs real epochs the
    fit runs one Lightning epoch whose training step takes all tau updates: the same operations in the same order
    (bit-identical), without an epoch's machinery per update.
    """

    def __init__(self, callbacks: list[L.Callback], settings: TrainerSettings | None = None):
        self.callbacks = list(callbacks)
        self.settings = settings or TrainerSettings()
        self.device = resolve_device(self.settings.accelerator)
        self.trainer = L.Trainer(
            accelerator=self.device.type,
            strategy=_StayOnDevice(device=self.device),
            precision=self.settings.precision,  # type: ignore[arg-type]
            max_epochs=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=self.callbacks,
        )
        self.epochs_in_one_step = not any(needs_epochs(c) for c in self.callbacks)

    def fit(self, module: ClientModule, loader, epochs: int) -> dict[str, float]:
        trainer = self.trainer
        # only the base training_step takes several updates per batch; a module's own step takes one (automatic)
        fused = (
            self.epochs_in_one_step
            and not module.automatic_optimization
            and getattr(loader.sampler, "whole_dataset", False)
        )
        module.steps_per_batch = epochs if fused else 1
        module.epochs_fused = fused
        module.compile_steps = self.settings.compile
        trainer.fit_loop.max_epochs = trainer.current_epoch + (1 if fused else epochs)
        trainer.should_stop = False
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
            trainer.fit(module, train_dataloaders=loader)
        metrics = {"client_time_s": time.perf_counter() - start, "train_loss": float(module.last_train_loss)}
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        for callback in self.callbacks:
            if isinstance(callback, ClientCallback):
                metrics.update(callback.client_metrics())
        return metrics

    def statistics(self) -> dict[str, Tensor]:
        stats: dict[str, Tensor] = {}
        for callback in self.callbacks:
            if isinstance(callback, ClientCallback):
                stats.update(callback.client_statistics())
        return stats


def set_local_epochs(trainer: L.Trainer, module: L.LightningModule, epochs: int) -> None:
    """Change the number of local epochs of the fit under way, from a callback's `on_train_start` (e.g. FIPA's
    adaptive local epochs): the updates of the one fused step, or the fit loop's epoch budget."""
    if isinstance(module, ClientModule) and module.epochs_fused:
        module.steps_per_batch = epochs
    else:
        trainer.fit_loop.max_epochs = trainer.current_epoch + epochs


def resolve_device(accelerator: str) -> torch.device:
    """The torch device of `trainer.accelerator`: cpu, gpu/cuda (a clear error without CUDA), or auto."""
    from fipa.errors import ConfigError

    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible to this process; use "
                "trainer.accelerator=cpu or auto (with executor=ray, also set executor.gpus_per_worker)"
            )
        return torch.device("cuda")
    if accelerator == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"trainer.accelerator must be one of auto, cpu, gpu, got {accelerator!r}")


def train_client(
    client_id: int,
    module: ClientModule,
    flat: FlatParameters,
    global_params: Tensor,
    local_data: Any,
    loader,
    epochs: int,
    local_trainer: LocalTrainer,
    round_idx: int = 0,
) -> ClientUpdate:
    """One client's round: start from the broadcast point, train locally, return the update.

    If local training raises, the parameters' trainable flags (a callback may have frozen some) are restored
    before the error propagates, so the next client starts from a clean module.
    """
    flat.set(global_params)
    module.local_data, module.client_id, module.round_idx = local_data, client_id, round_idx
    trainable = [p.requires_grad for p in module.parameters()]
    try:
        metrics = local_trainer.fit(module, loader, epochs)
    except Exception:
        for p, flag in zip(module.parameters(), trainable):
            p.requires_grad_(flag)
        raise
    delta = flat.get() - global_params
    return ClientUpdate(
        client_id=client_id,
        num_samples=len(local_data),
        delta=delta,
        statistics=local_trainer.statistics(),
        metrics=metrics,
    )
