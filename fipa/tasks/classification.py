"""Classification clients: softmax cross-entropy, whose GGN is the model's true Fisher."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from fipa.client import ClientModule
from fipa.curvature import CurvatureGroup
from fipa.data import TensorData
from fipa.tasks.base import FederatedTask


class ClassificationModule(ClientModule):
    curvature_outputs_are_model_outputs = True  # the model's outputs: K-FAC may hook its layers
    # optional batch transform (batch, generator) -> batch for training, never for curvature or evaluation; it draws
    # from the job's generator, so a client's augmentation depends only on (seed, round, client)
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None

    def training_loss(self, batch):
        x, y = batch
        if self.augment is not None:
            x = self.augment(x, self.generator)
        self.last_batch = (x, y)  # what this step trained on, augmented: for client methods' extra terms (FedRCL)
        return F.cross_entropy(self.model(x), y)

    def data_loss(self, data: TensorData, chunk: int = 2000) -> Tensor:
        """Mean cross-entropy over all local images, unaugmented, in chunks (bounded memory)."""
        x, y = data.tensors[:2]
        losses = [
            F.cross_entropy(self.model(xs), ys, reduction="sum") for xs, ys in zip(x.split(chunk), y.split(chunk))
        ]
        return torch.stack(losses).sum() / len(y)

    def per_sample_logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, params, (x.unsqueeze(0),)).squeeze(0)

    def curvature_groups(self, data: TensorData) -> list[CurvatureGroup]:
        x, y = data.tensors[:2]
        return [CurvatureGroup(self.per_sample_logits, x, y, loss="cross_entropy", weight=1.0 / len(x))]


class ClassificationTask(FederatedTask):
    """Clients hold tensors of images and labels; the global model is scored on a shared test set."""

    metric = "test_acc"
    lower_is_better = False

    def __init__(
        self,
        client_data: Sequence[tuple[Tensor, Tensor]],
        test_data: tuple[Tensor, Tensor],
        num_classes: int,
        batch_size: int | None = 50,
        eval_batch_size: int = 2000,
    ):
        super().__init__(batch_size)
        self.datasets = [TensorData(x, y) for x, y in client_data]
        self.test_x, self.test_y = test_data
        self.num_classes = num_classes
        self.input_dim = self.test_x.shape[1]  # channels
        self.output_dim = num_classes
        self.eval_batch_size = eval_batch_size

    def build_module(self, model: nn.Module, optimizer) -> ClassificationModule:
        return ClassificationModule(model, optimizer)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        logits = torch.cat([model(x) for x in self.test_x.split(self.eval_batch_size)])
        model.train(was_training)
        return {
            "test_acc": multiclass_accuracy(logits, self.test_y, self.num_classes, average="micro").item(),
            "test_loss": F.cross_entropy(logits, self.test_y).item(),
        }
