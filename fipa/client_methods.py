"""Client-side methods: Lightning callbacks that change local training and combine with any server rule."""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning import LightningModule, Trainer

from fipa.client import ClientCallback, client_model
from fipa.errors import require


def add_drift_gradient(params, anchors, coefficient: float, linear=None) -> None:
    """In place, for the parameters that have a gradient: grad += coefficient (theta - anchor), minus `linear` if
    given: the gradient of coefficient/2 ||theta - anchor||^2 - <linear, theta> (FedProx's proximal term, FedDyn's
    dynamic regulariser, FedRCL's proximal term), without a graph."""
    extra = [None] * len(params) if linear is None else linear
    rows = [(p, a, v) for p, a, v in zip(params, anchors, extra) if p.grad is not None]
    if not rows:
        return
    with_grad, anchored, linear_terms = zip(*rows)
    grads = [p.grad for p in with_grad]
    torch._foreach_add_(grads, torch._foreach_sub([p.detach() for p in with_grad], list(anchored)), alpha=coefficient)
    if linear is not None:
        torch._foreach_sub_(grads, list(linear_terms))


class ProximalTerm(ClientCallback):
    """FedProx's client half: adds mu/2 ||w - w_global||^2 to the local objective.

    Its gradient mu (w - w_global) is added to the parameter gradients before every optimizer step, which
    equals differentiating the extra loss term but costs no graph.
    """

    def __init__(self, mu: float):
        require(mu >= 0, f"the proximal coefficient mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self._anchor: list[torch.Tensor] = []
        self._params: list[torch.Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Local training starts at the broadcast point, so the anchor is the global model.
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in self._params]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.mu != 0:
            add_drift_gradient(self._params, self._anchor, self.mu)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._anchor, self._params = [], []


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class Scaffold(ClientCallback):
    """SCAFFOLD (Karimireddy et al., 2020), option II, as a client method usable with any server rule.

    Every local gradient is corrected by (c - c_i). After local training with K steps of learning rate lr,
    c_i <- c_i - c + (x - y) / (K lr); the client uploads delta c_i, and the server control moves by
    c <- c + (1/num_clients) sum_i delta c_i when the next round starts, so no aggregator support is needed.
    Server side: c, the clients' c_i (flat CPU tensors, one per client that has trained, never a model object)
    and the running sum. Worker side: the correction for the client being trained.

    `clip_norm` clips the corrected gradient's norm before each step, as Acar et al.'s SCAFFOLD baseline does (norm
    10): with few clients a round, stale c_i can make the correction outgrow the gradient and the run diverge.
    """

    def __init__(self, clip_norm: float | None = None):
        require(clip_norm is None or clip_norm > 0, f"client.clip_norm must be > 0 or null, got {clip_norm}")
        self.clip_norm = clip_norm
        self.server_control: torch.Tensor | None = None
        self.client_controls: dict[int, torch.Tensor] = {}
        self._pending: torch.Tensor | None = None  # sum of this round's delta c_i, applied next round

    # server side
    def on_round_start(self, round_idx: int, num_clients: int) -> None:
        if self._pending is not None and self.server_control is not None:
            self.server_control += self._pending / num_clients
            self._pending = None

    def round_state(self) -> torch.Tensor | None:
        return self.server_control

    def client_state(self, client_id: int) -> torch.Tensor | None:
        return self.client_controls.get(client_id)

    def on_client_result(self, client_id: int, update, state: torch.Tensor | None) -> None:
        delta = update.statistics.get("control_variate")
        if delta is None:  # no local step was taken
            return
        if state is not None:  # None where c_i stays on the client (fipa.flower)
            self.client_controls[client_id] = state.cpu()  # one flat host tensor per client, whatever the device
        if self.server_control is None:
            self.server_control = torch.zeros_like(delta)
        if self._pending is None:
            self._pending = torch.zeros_like(delta)
        self._pending += delta

    # worker side
    def begin_client(self, client_id: int, round_state, client_state) -> None:
        self._server, self._client = round_state, client_state
        self._new_control = self._delta = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._params = [p for p in client_model(pl_module).parameters()]
        start = _flat(self._params)
        self._start = start
        self._server = torch.zeros_like(start) if self._server is None else self._server.to(start.device)
        self._client = torch.zeros_like(start) if self._client is None else self._client.to(start.device)
        correction = self._server - self._client
        self._correction = [
            c.view_as(p) for c, p in zip(correction.split([p.numel() for p in self._params]), self._params)
        ]
        self._steps, self._lr = 0, 0.0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        pairs = [(p, c) for p, c in zip(self._params, self._correction) if p.grad is not None]
        if pairs:
            params, corrections = zip(*pairs)
            torch._foreach_add_([p.grad for p in params], list(corrections))
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        self._steps += 1
        self._lr = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._steps == 0:
            return
        self._new_control = self._client - self._server + (self._start - _flat(self._params)) / (self._steps * self._lr)
        self._delta = self._new_control - self._client

    def end_client(self) -> torch.Tensor | None:
        return self._new_control

    def client_statistics(self) -> dict[str, torch.Tensor]:
        return {} if self._delta is None else {"control_variate": self._delta}

    def state_dict(self) -> dict:
        return {
            "server_control": self.server_control,
            "client_controls": self.client_controls,
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self.server_control, self.client_controls = state["server_control"], dict(state["client_controls"])
        self._pending = state["pending"]


class Moon(ClientCallback):
    """MOON (Li et al., 2021): a model-contrastive term mu * l_con on the representation `model.features(x)`.

    l_con = -log(e^{sim(z, z_glob)/T} / (e^{sim(z, z_glob)/T} + e^{sim(z, z_prev)/T})) pulls the local
    representation towards the global model's and away from this client's previous local model's. Its
    gradient is added after the main backward pass (an extra backward on the same batch). Previous local
    models are kept as flat CPU tensors per client.
    """

    def __init__(self, mu: float = 1.0, temperature: float = 0.5):
        require(mu >= 0, f"client.mu must be >= 0, got {mu}")
        require(temperature > 0, f"client.temperature must be > 0, got {temperature}")
        self.mu, self.temperature = float(mu), float(temperature)
        self.previous: dict[int, torch.Tensor] = {}  # server side: each client's last local model, flat on CPU
        self._previous_flat: torch.Tensor | None = None

    def _frozen_copy(self, model, flat: torch.Tensor | None) -> Any:
        import copy

        clone = copy.deepcopy(model).eval()
        if flat is not None:
            torch.nn.utils.vector_to_parameters(flat.to(next(clone.parameters()).device), clone.parameters())
        return clone.requires_grad_(False)

    # server side: the clients' previous local models
    def client_state(self, client_id: int) -> torch.Tensor | None:
        return self.previous.get(client_id)

    def on_client_result(self, client_id: int, update, state: torch.Tensor | None) -> None:
        if state is not None:  # None where the previous model stays on the client (fipa.flower)
            self.previous[client_id] = state.cpu()  # one flat host tensor per client, whatever the device

    # worker side
    def begin_client(self, client_id: int, round_state, client_state) -> None:
        self._previous_flat = client_state

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require(hasattr(client_model(pl_module), "features"), "client=moon needs a model with a features(x) method")
        self._global = self._frozen_copy(client_model(pl_module), None)
        previous = self._previous_flat
        self._previous = self._global if previous is None else self._frozen_copy(client_model(pl_module), previous)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._inputs = batch[0]

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mu == 0:
            return
        x = self._inputs
        model: Any = client_model(pl_module)  # a model with features(x)
        z = model.features(x)
        if not z.requires_grad:  # representation layers frozen (e.g. a last-layer FIPA phase): no gradient to add
            return
        with torch.no_grad():
            z_global, z_previous = self._global.features(x), self._previous.features(x)
        similarities = torch.stack(
            [torch.cosine_similarity(z, z_global, dim=1), torch.cosine_similarity(z, z_previous, dim=1)], dim=1
        )
        target = torch.zeros(len(x), dtype=torch.long, device=x.device)
        loss = self.mu * torch.nn.functional.cross_entropy(similarities / self.temperature, target)
        loss.backward()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._local = torch.nn.utils.parameters_to_vector(client_model(pl_module).parameters()).detach().clone()
        self._global = self._previous = None  # the frozen copies go with the fit

    def end_client(self) -> torch.Tensor:
        return self._local

    def state_dict(self) -> dict:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state["previous"])


# ------------------------------------------------------------------------------------------------------ FedDyn


def feddyn_client_state(state: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """FedDyn's client state after a round: g_k - alpha (theta_k - theta_global) (the first-order condition of
    its dynamic regulariser at the local solution)."""
    return state - alpha * delta


def feddyn_server_state(h: torch.Tensor, old: torch.Tensor, new: torch.Tensor, num_clients: int) -> torch.Tensor:
    """h after one client's state moved from `old` to `new`: h - (alpha / m) Delta_k, i.e. h stays the mean of all
    m clients' states (those that never trained count as 0)."""
    return h + (new - old) / num_clients


def feddyn_model(params: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    """The server's model after aggregation: theta - h / alpha."""
    return params - h / alpha


class FedDyn(ClientCallback):
    """FedDyn (Acar et al., ICLR 2021) as a client method usable with any server rule.

    Client k minimises L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta_global||^2: its gradients get
    alpha (theta - theta_global) - g_k before every optimizer step, and after the fit g_k <- g_k - alpha Delta_k.
    Server side: every client's g_k (flat CPU tensors, like SCAFFOLD's controls) and h = (1/m) sum_k g_k, kept
    incrementally; the round's model (whatever the aggregator and server optimizer made of it) becomes
    theta - h / alpha. With aggregator=fedavg on equal-sized clients this is the paper's algorithm.
    """

    def __init__(self, alpha: float = 0.01):
        require(alpha > 0, f"client.alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.h: torch.Tensor | None = None
        self.client_states: dict[int, torch.Tensor] = {}
        self._num_clients = 1

    # server side
    def on_round_start(self, round_idx: int, num_clients: int) -> None:
        self._num_clients = num_clients

    def client_state(self, client_id: int) -> torch.Tensor | None:
        return self.client_states.get(client_id)

    server_keeps_client_state = True  # h is the mean of every client's state: the server needs each new one

    def on_client_result(self, client_id: int, update, state: torch.Tensor | None) -> None:
        if state is None:
            return
        state = state.cpu()
        old = self.client_states.get(client_id, torch.zeros_like(state))
        self.h = feddyn_server_state(
            torch.zeros_like(state) if self.h is None else self.h, old, state, self._num_clients
        )
        self.client_states[client_id] = state

    def on_round_end(self, params: torch.Tensor) -> torch.Tensor:
        return params if self.h is None else feddyn_model(params, self.h.to(params.device), self.alpha)

    # worker side
    def begin_client(self, client_id: int, round_state, client_state) -> None:
        self._state: torch.Tensor | None = client_state
        self._new_state: torch.Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._params = [p for p in client_model(pl_module).parameters()]
        self._start = _flat(self._params)
        state = torch.zeros_like(self._start) if self._state is None else self._state.to(self._start.device)
        self._state = state
        sizes = [p.numel() for p in self._params]
        self._anchors = [a.view_as(p) for a, p in zip(self._start.split(sizes), self._params)]
        self._linear = [s.view_as(p) for s, p in zip(state.split(sizes), self._params)]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        add_drift_gradient(self._params, self._anchors, self.alpha, self._linear)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._state is not None  # set by on_train_start
        self._new_state = feddyn_client_state(self._state, _flat(self._params) - self._start, self.alpha)
        self._anchors = self._linear = []

    def end_client(self) -> torch.Tensor | None:
        return self._new_state

    def state_dict(self) -> dict:
        return {"h": self.h, "client_states": self.client_states}

    def load_state_dict(self, state: dict) -> None:
        self.h, self.client_states = state["h"], dict(state["client_states"])


# ------------------------------------------------------------------------------------------------------ FedRCL


def cosine_similarities(features: torch.Tensor) -> torch.Tensor:
    """s_ij = cos(f_i, f_j) of a batch of representations (flattened; a feature map is average-pooled first)."""
    if features.dim() > 2:
        features = features.flatten(2).mean(2) if features.dim() > 3 else features.flatten(1)
    normed = torch.nn.functional.normalize(features, dim=1)
    return normed @ normed.T


def _contrastive_rows(positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors of -log(e^{p/T} / (e^{p/T} + sum_n e^{n/T})); a -inf negative is absent (an anchor with
    none adds exactly 0)."""
    logits = torch.cat([positive.unsqueeze(1), negatives], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def supervised_contrastive_loss(
    similarities: torch.Tensor, labels: torch.Tensor, temperature: float, negatives: int
) -> torch.Tensor:
    """FedRCL's supervised term: per anchor, its hardest positive (least similar sample of its class, itself
    included) against its `negatives` most similar samples of other classes."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive = similarities.masked_fill(~same, float("inf")).min(dim=1).values
    other = similarities.masked_fill(same, float("-inf"))
    return _contrastive_rows(positive, other.topk(min(negatives, len(labels)), dim=1).values, temperature)


def divergence_penalty(
    similarities: torch.Tensor, labels: torch.Tensor, temperature: float, threshold: float, negatives: int = 1
) -> torch.Tensor:
    """FedRCL's relaxation: per anchor, itself as the positive against the `negatives` least similar other samples
    of its class, each only if its similarity is >= `threshold`, so a class is pushed apart only where it has
    collapsed (as the authors' released code: 1 negative, threshold 0.7)."""
    n = len(labels)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    others = same & ~torch.eye(n, dtype=torch.bool, device=labels.device)
    candidates = similarities.masked_fill(~others, float("inf")).topk(min(negatives, n), dim=1, largest=False).values
    kept = candidates.masked_fill((candidates < threshold) | torch.isinf(candidates), float("-inf"))
    return _contrastive_rows(similarities.diagonal(), kept, temperature)


def feature_alignment_loss(local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(local_i, global_i) over the batch (cosine embedding loss with target 1)."""
    local, global_ = (f.flatten(2).mean(2) if f.dim() > 3 else f.flatten(1) for f in (local, global_))
    return (1 - torch.nn.functional.cosine_similarity(local, global_, dim=1)).mean()


class FedRCL(ClientCallback):
    """FedRCL (Seo et al., CVPR 2024): relaxed contrastive learning on the client, usable with any server rule.

    Beside the task's cross-entropy, each local step adds, averaged over the chosen representation levels
    (`model.layer_features`; feature maps average-pooled; the levels `layers`, all by default):

        scl_weight   x supervised_contrastive_loss     (temperature, `negatives` hardest other-class samples)
        penalty_weight x divergence_penalty            (same-class pairs above `threshold` pushed apart)
        align_weight x feature_alignment_loss          (towards the global model's representation)
        prox_weight  x ||theta - theta_global||^2      (as written in the authors' code: no 1/2)

    and clips the gradient's norm to `clip_norm` before the optimizer step. The extra terms cost one more forward
    and backward pass per step (their gradients add to the cross-entropy's, as MOON's do). Levels without a
    gradient (frozen by a last-layer FIPA phase) are skipped.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        negatives: int = 2,
        threshold: float = 0.7,
        penalty_negatives: int = 1,
        scl_weight: float = 1.0,
        penalty_weight: float = 1.0,
        align_weight: float = 0.0,
        prox_weight: float = 0.0,
        clip_norm: float | None = 10.0,
        layers: list[int] | None = None,
    ):
        require(temperature > 0, f"client.temperature must be > 0, got {temperature}")
        require(negatives >= 1 and penalty_negatives >= 1, "client.negatives and client.penalty_negatives must be >= 1")
        weights = (scl_weight, penalty_weight, align_weight, prox_weight)
        require(min(weights) >= 0, f"the FedRCL loss weights must be >= 0, got {weights}")
        require(clip_norm is None or clip_norm > 0, f"client.clip_norm must be > 0 or null, got {clip_norm}")
        self.temperature, self.negatives, self.threshold = float(temperature), int(negatives), float(threshold)
        self.penalty_negatives = int(penalty_negatives)
        self.scl_weight, self.penalty_weight = float(scl_weight), float(penalty_weight)
        self.align_weight, self.prox_weight = float(align_weight), float(prox_weight)
        self.clip_norm = clip_norm
        self.layers = None if layers is None else list(layers)

    def representation_loss(self, local: list[torch.Tensor], global_: list[torch.Tensor], labels: torch.Tensor):
        """The weighted contrastive, penalty and alignment terms, each averaged over the chosen levels."""
        chosen = range(len(local)) if self.layers is None else self.layers
        pairs = [(local[i], global_[i]) for i in chosen if local[i].requires_grad]
        if not pairs:
            return None
        total = local[0].new_zeros(())
        for f, g in pairs:
            s = cosine_similarities(f)
            total = total + self.scl_weight * supervised_contrastive_loss(s, labels, self.temperature, self.negatives)
            total = total + self.penalty_weight * divergence_penalty(
                s, labels, self.temperature, self.threshold, self.penalty_negatives
            )
            if self.align_weight:
                total = total + self.align_weight * feature_alignment_loss(f, g)
        return total / len(pairs)

    def validate(self, model: torch.nn.Module) -> None:
        require(
            hasattr(model, "layer_features"),
            f"client=fedrcl needs a model with layer_features(x) (SmallCNN, ResNet20GN); {type(model).__name__} has none",
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = client_model(pl_module)
        import copy

        self._global: Any = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in self._params]

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        x, y = cast(tuple[torch.Tensor, torch.Tensor], pl_module.last_batch)
        model: Any = client_model(pl_module)
        _, local = model.layer_features(x)
        with torch.no_grad():
            _, global_ = self._global.layer_features(x)
        loss = self.representation_loss(local, global_, y)
        if loss is not None:
            loss.backward()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.prox_weight:
            add_drift_gradient(self._params, self._anchor, 2 * self.prox_weight)
        with_grad = [p for p in self._params if p.grad is not None]
        if self.clip_norm is not None and with_grad:
            torch.nn.utils.clip_grad_norm_(with_grad, self.clip_norm)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._global, self._params, self._anchor = None, [], []
