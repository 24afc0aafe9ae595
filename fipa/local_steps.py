"""The inner loop of local training: `steps` optimizer updates on one batch, eager or compiled.

Lightning drives a client's local fit (epochs, batches, every epoch and batch hook). Inside one `training_step`,
these classes take the updates, so a full-batch task runs its tau updates in one Lightning step instead of paying
an epoch's machinery per update. The per-update callback hooks still fire, in Lightning's order, for every
update: `on_before_backward(loss)`, `on_after_backward()`, `on_before_optimizer_step(optimizer)` (callbacks first,
then the module), so client methods such as FedProx's proximal term or SCAFFOLD's correction work unchanged.

- `EagerSteps`: zero_grad, loss, backward, step. The hooks are called directly, only those some callback or the
  module overrides, which skips Lightning's generic dispatch (about 0.1 ms an update on a tiny MLP). With a
  gradient scaler (precision="16-mixed") the updates go through Lightning's own `manual_backward` and optimizer
  step instead, which apply the scaler. Same operations as Lightning's manual optimization: bit-identical results.
- `CompiledSteps` (`trainer.compile=true`): forward + backward come from `torch.func.grad_and_value` of the
  module's functional loss, and the update from torch.optim's functional Adam/AdamW/SGD, each compiled with
  `torch.compile`; per-update hooks run eagerly in between, on real `.grad` tensors. The learning rate and the
  step count are tensors, so a new round (a new lr, a fresh optimizer state) reuses the graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
COMPILABLE_OPTIMIZERS = ("Adam", "AdamW", "SGD")


def overrides(obj: Any, hook: str) -> bool:
    """Whether a callback or LightningModule overrides a Lightning hook (the base classes' hooks do nothing)."""
    base = L.LightningModule if isinstance(obj, L.LightningModule) else L.Callback
    return getattr(type(obj), hook, None) is not getattr(base, hook, None)


class StepHooks:
    """The per-update hooks that some callback (or the module) overrides, in Lightning's order: callbacks, then the
    LightningModule. Bound once per fit, so an update calls exactly the hooks that do something."""

    def __init__(self, trainer: L.Trainer, module: L.LightningModule):
        def bound(target: Any, hook: str) -> Callable[..., None]:  # callbacks also get (trainer, module)
            method = getattr(target, hook)
            return method if target is module else functools.partial(method, trainer, module)

        targets = [*trainer.callbacks, module]  # type: ignore[attr-defined]
        self.hooks = {hook: [bound(t, hook) for t in targets if overrides(t, hook)] for hook in STEP_HOOKS}
        self.any = any(self.hooks.values())

    def before_backward(self, loss: Tensor) -> None:
        for hook in self.hooks["on_before_backward"]:
            hook(loss)

    def after_backward(self) -> None:
        for hook in self.hooks["on_after_backward"]:
            hook()

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for hook in self.hooks["on_before_optimizer_step"]:
            hook(optimizer)


class EagerSteps:
    def __init__(self, module: L.LightningModule, loss_fn: Callable[[Any], Tensor]):
        trainer = module.trainer
        self.module, self.loss_fn = module, loss_fn
        self.hooks = StepHooks(trainer, module)
        self.lightning_optimizer = module.optimizers()
        self.optimizer: torch.optim.Optimizer = self.lightning_optimizer.optimizer  # type: ignore[union-attr]
        # A gradient scaler must see the backward and the step: then Lightning's own path applies it.
        self.through_lightning = getattr(trainer.precision_plugin, "scaler", None) is not None

    def run(self, batch: Any, steps: int) -> Tensor:
        loss = torch.full((), float("nan"), device=self.module.device)
        for _ in range(steps):
            loss = self._lightning_step(batch) if self.through_lightning else self._step(batch)
        return loss.detach()

    def _step(self, batch: Any) -> Tensor:
        optimizer, hooks = self.optimizer, self.hooks
        optimizer.zero_grad()
        loss = self.loss_fn(batch)
        hooks.before_backward(loss)
        loss.backward()
        hooks.after_backward()
        hooks.before_optimizer_step(optimizer)
        optimizer.step()
        return loss

    def _lightning_step(self, batch: Any) -> Tensor:
        optimizer = self.lightning_optimizer
        optimizer.zero_grad()  # type: ignore[union-attr]
        loss = self.loss_fn(batch)
        self.module.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss


class _LossOf(nn.Module):
    """The client's training loss as a module of its parameters, for torch.func.functional_call."""

    def __init__(self, client: L.LightningModule, loss_fn: Callable[[Any], Tensor]):
        super().__init__()
        self.client = client
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(batch)


def _functional_update(optimizer: torch.optim.Optimizer) -> tuple[Callable[..., None], dict[str, Any]]:
    """torch.optim's functional update for the optimizer's class, and its hyperparameters (lr excluded)."""
    from torch.optim import adam, adamw, sgd

    group = optimizer.param_groups[0]
    name = type(optimizer).__name__
    # single-tensor implementations: they take the lr as a tensor without `capturable`, and inductor fuses them
    common = {"foreach": False, "fused": None, "grad_scale": None, "found_inf": None, "maximize": group["maximize"],
              "weight_decay": group["weight_decay"]}  # fmt: skip
    if name in ("Adam", "AdamW"):
        beta1, beta2 = group["betas"]
        settings = dict(common, capturable=False, differentiable=False, has_complex=False, amsgrad=group["amsgrad"],
                        beta1=beta1, beta2=beta2, eps=group["eps"])  # fmt: skip
        return (adam.adam if name == "Adam" else adamw.adamw), settings
    settings = dict(common, has_sparse_grad=False, momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"])  # fmt: skip
    return sgd.sgd, settings


def check_compilable(optimizer: torch.optim.Optimizer) -> None:
    """trainer.compile=true needs an optimizer whose update torch.optim offers as a function."""
    name = type(optimizer).__name__
    if name not in COMPILABLE_OPTIMIZERS or len(optimizer.param_groups) != 1:
        from fipa.errors import ConfigError

        raise ConfigError(
            f"trainer.compile=true supports one-group {', '.join(COMPILABLE_OPTIMIZERS)} client optimizers, got {name}; "
            "set trainer.compile=false"
        )
    group = optimizer.param_groups[0]
    if name == "SGD" and group["momentum"] and group["dampening"]:
        from fipa.errors import ConfigError

        # torch's SGD starts its momentum buffer at the first gradient; a zero buffer is the same only without dampening
        raise ConfigError("trainer.compile=true supports SGD momentum with dampening=0 only")


class CompiledSteps:
    """Compiled updates for one module; built once per (optimizer class, trainable parameters, hook mode) and
    reused by every later fit of the module: a new round only refills the lr and the optimizer state."""

    def __init__(self, module: L.LightningModule, loss_fn: Callable[[Any], Tensor], optimizer: torch.optim.Optimizer):
        check_compilable(optimizer)
        self.module = module
        self.kind = type(optimizer).__name__
        model: nn.Module = module.model  # type: ignore[assignment]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        self.update, self.settings = _functional_update(optimizer)
        self.wrapper = _LossOf(module, loss_fn)
        self.lr = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        # Two graphs: one graph holding both the gradient and an update that reads the parameters (weight decay)
        # gave wrong updates with torch 2.14's inductor, and the split costs ~10% of a fused step on a tiny MLP.
        self._grad = torch.compile(torch.func.grad_and_value(self._loss))
        self._update = torch.compile(self._apply_update)

    @staticmethod
    def key_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        """What a compiled update depends on: the optimizer's kind and settings and which parameters train."""
        settings = tuple((k, v) for k, v in optimizer.param_groups[0].items() if k not in ("params", "lr"))
        return type(optimizer).__name__, settings, tuple(n for n, p in model.named_parameters() if p.requires_grad)

    # The traced functions ---------------------------------------------------------------------------------
    def _loss(self, params: list[Tensor], batch: Any) -> Tensor:
        prefixed = {f"client.model.{n}": p for n, p in zip(self.names, params)}
        return torch.func.functional_call(self.wrapper, prefixed, (batch,), strict=False)

    def _apply_update(self, params: list[Tensor], grads: list[Tensor], state: list[list[Tensor]], lr: Tensor) -> None:
        with torch.no_grad():
            if self.kind == "SGD":
                momentum = state[0] if self.settings["momentum"] else [None] * len(params)
                self.update(params, grads, momentum, lr=lr, **self.settings)
            else:
                exp_avgs, exp_avg_sqs, max_sqs, steps = state
                self.update(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, lr=lr, **self.settings)

    # One fit ----------------------------------------------------------------------------------------------
    def fresh_state(self, optimizer: torch.optim.Optimizer) -> list[list[Tensor]]:
        """Zero optimizer state (registered with the optimizer object too, for hooks that look at it)."""
        zeros = lambda: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        if self.kind == "SGD":  # a zero momentum buffer: the first step gives buf = 0 * momentum + g, as torch's SGD
            return [zeros()] if self.settings["momentum"] else []
        steps = [torch.zeros((), dtype=torch.float64, device=p.device) for p in self.params]
        max_sqs = zeros() if self.settings["amsgrad"] else []
        state = [zeros(), zeros(), max_sqs, steps]
        for p, m, v, t in zip(self.params, state[0], state[1], steps):
            optimizer.state[p] = {"step": t, "exp_avg": m, "exp_avg_sq": v}
        return state

    def begin_fit(self, optimizer: torch.optim.Optimizer) -> None:
        """A new local fit: zero optimizer state and the fit's learning rate (lr decay, phase scaling)."""
        self.state = self.fresh_state(optimizer)
        self.lr.fill_(optimizer.param_groups[0]["lr"])

    def run(self, batch: Any, steps: int, optimizer: torch.optim.Optimizer, hooks: StepHooks) -> Tensor:
        state = self.state
        loss = torch.full((), float("nan"), device=self.lr.device)
        for _ in range(steps):
            grads, loss = self._grad([p.detach() for p in self.params], batch)
            if hooks.any:  # the hooks see (and may change) the gradients as .grad, as in an eager step
                hooks.before_backward(loss)
                for p, g in zip(self.params, grads):
                    p.grad = g
                hooks.after_backward()
                hooks.before_optimizer_step(optimizer)
                grads = [p.grad for p in self.params]
            self._update(self.params, grads, state, self.lr)
        return loss.detach()
