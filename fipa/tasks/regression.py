"""Nonlinear function regression with feature-space non-IID clients (FIPA_SPEC section 5.1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipa.client import ClientModule
from fipa.curvature import CurvatureGroup
from fipa.data import TensorData
from fipa.errors import require
from fipa.seeding import DATA, torch_generator
from fipa.tasks.base import FederatedTask

# (A, mx, my, sx, sy) of the six anisotropic Gaussians of the 2-D target.
GAUSSIANS_2D = (
    (1.40, 0.18, 0.28, 0.06, 0.05),
    (0.90, 0.50, 0.28, 0.10, 0.06),
    (0.95, 0.82, 0.28, 0.11, 0.07),
    (0.75, 0.18, 0.72, 0.07, 0.06),
    (0.70, 0.50, 0.82, 0.07, 0.07),
    (0.80, 0.82, 0.74, 0.10, 0.07),
)


def sine_target(x: Tensor, frequency: float) -> Tensor:
    return torch.sin(frequency * math.pi * x)


def gaussian_mixture_target(xy: Tensor) -> Tensor:
    x, y = xy[:, :1], xy[:, 1:2]
    bumps = [
        a * torch.exp(-(((x - mx) / sx) ** 2) / 2 - ((y - my) / sy) ** 2 / 2) for a, mx, my, sx, sy in GAUSSIANS_2D
    ]
    return sum(bumps[1:], bumps[0])


def uniform_in_box(lower: Sequence[float], upper: Sequence[float], n: int, generator, dtype) -> Tensor:
    lo = torch.tensor(lower, dtype=dtype)
    hi = torch.tensor(upper, dtype=dtype)
    return lo + (hi - lo) * torch.rand(n, len(lower), generator=generator, dtype=dtype)


class RegressionModule(ClientModule):
    """MSE regression client. Its GGN is the mean of J_i^T J_i (S = I up to the loss constant)."""

    curvature_outputs_are_model_outputs = True  # the model's outputs: K-FAC may hook its layers

    def training_loss(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def per_sample_output(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, params, (x.unsqueeze(0),)).squeeze(0)

    def curvature_groups(self, data: TensorData) -> list[CurvatureGroup]:
        x, y = data.tensors
        return [CurvatureGroup(self.per_sample_output, x, y, loss="mse", weight=1.0 / len(x))]


class RegressionTask(FederatedTask):
    """Clients own boxes of the input space; the target function is known, the test set is a grid."""

    metric = "test_mse"

    def __init__(
        self,
        boxes: Sequence[tuple[Sequence[float], Sequence[float]]],
        target: Callable[[Tensor], Tensor],
        test_inputs: Tensor,
        points_per_client: int,
        seed: int,
        dtype: torch.dtype = torch.float64,
        batch_size: int | None = None,
    ):
        super().__init__(batch_size)
        require(points_per_client >= 1, f"points_per_client must be >= 1, got {points_per_client}")
        generator = torch_generator(seed, DATA)
        self.boxes = [(tuple(lo), tuple(hi)) for lo, hi in boxes]
        self.target = target
        self.input_dim = test_inputs.shape[1]
        self.output_dim = 1
        inputs = [uniform_in_box(lo, hi, points_per_client, generator, dtype) for lo, hi in self.boxes]
        self.datasets = [TensorData(x, target(x)) for x in inputs]
        self.test_inputs = test_inputs.to(dtype)
        self.test_targets = target(self.test_inputs)

    def build_module(self, model: nn.Module, optimizer) -> RegressionModule:
        return RegressionModule(model, optimizer)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"test_mse": F.mse_loss(model(self.test_inputs), self.test_targets).item()}

    @torch.no_grad()
    def save_artifacts(self, model: nn.Module, output_dir) -> None:
        """fit.png: the fitted function against the target, client regions shaded (1-D), or the error map (2-D);
        predictions.npz: the same numbers, for scripts/plot.py."""
        from fipa.plotting import plot_error_map_2d, plot_fit_1d, save_predictions

        prediction = model(self.test_inputs)
        save_predictions(
            Path(output_dir) / "predictions.npz", self.test_inputs, self.test_targets, prediction, self.boxes
        )
        if self.input_dim == 1:
            plot_fit_1d(self.test_inputs, self.test_targets, prediction, self.boxes, Path(output_dir) / "fit.png")
        elif self.input_dim == 2:
            plot_error_map_2d(self.test_inputs, self.test_targets, prediction, self.boxes, Path(output_dir) / "fit.png")


class Sine1D(RegressionTask):
    """sin(frequency * pi * x) on [0, 1]; client m owns [edges[m], edges[m+1]]."""

    def __init__(
        self,
        edges: Sequence[float],
        frequency: float,
        seed: int,
        points_per_client: int = 400,
        test_points: int = 1024,
        dtype: torch.dtype = torch.float64,
        batch_size: int | None = None,
    ):
        edges = list(edges)
        require(len(edges) >= 2, f"edges needs at least two values, got {edges}")
        require(all(a < b for a, b in zip(edges[:-1], edges[1:])), f"edges must increase strictly, got {edges}")
        require(test_points >= 1, f"test_points must be >= 1, got {test_points}")
        boxes = [((lo,), (hi,)) for lo, hi in zip(edges[:-1], edges[1:])]
        test_inputs = torch.linspace(0.0, 1.0, test_points, dtype=dtype).unsqueeze(1)
        super().__init__(
            boxes, lambda x: sine_target(x, frequency), test_inputs, points_per_client, seed, dtype, batch_size
        )


class GaussianMixture2D(RegressionTask):
    """Sum of six anisotropic Gaussians on [0, 1]^2, cut into grid x grid client squares."""

    def __init__(
        self,
        seed: int,
        grid: int = 3,
        points_per_client: int = 1000,
        test_grid: int = 256,
        dtype: torch.dtype = torch.float64,
        batch_size: int | None = None,
    ):
        require(grid >= 1 and test_grid >= 1, "grid and test_grid must be >= 1")
        cuts = torch.linspace(0.0, 1.0, grid + 1).tolist()
        boxes = [((cuts[i], cuts[j]), (cuts[i + 1], cuts[j + 1])) for j in range(grid) for i in range(grid)]
        axis = torch.linspace(0.0, 1.0, test_grid, dtype=dtype)
        test_inputs = torch.cartesian_prod(axis, axis)
        super().__init__(boxes, gaussian_mixture_target, test_inputs, points_per_client, seed, dtype, batch_size)
