"""PDE learning with physics-informed neural networks, 2 clients split at x_1 = 0.5 (FIPA_SPEC section 5.2).

Each client owns a strip of [0, 1]^d along x_1 and minimizes

    mean(r_pde^2) + lambda_bc * mean(r_bc^2),   r_pde = N[u](x) - f(x),   r_bc = u(x) - g(x),

with N[u] computed from derivatives of the network w.r.t. its input (fipa.pde.operators): by forward
propagation of (u, grad u, Laplacian u) through the layers when the network is a plain Linear/activation stack
(`task.laplacian=auto`, the default, or `forward`), else by torch.func automatic differentiation, vectorized
over the batch of points (`autograd`). Its FIPA curvature is the GGN of the stacked residual
[r_pde ; sqrt(lambda_bc) r_bc] in the paper's sum form, H = J_pde^T J_pde + lambda_bc J_bc^T J_bc: two
CurvatureGroups with loss "mse", evaluated by the chunked machinery of fipa.curvature.

Problems (operator + exact solution) live in the registry of `fipa.pde`; this module only samples the domain,
trains and scores.

Boundary ownership **(our choice where the spec is silent)**: the face x_1 = 0 belongs to the first client, the
face x_1 = 1 to the last; the points of every other face are drawn stratified over the strips (each strip gets
its share of the face's points, proportional to its width) and belong to the client whose strip holds their
x_1. So every boundary point has exactly one owner and the clients' counts do not depend on the seed. In 1-D
the "faces" are the two end points, repeated `boundary_points` times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset

from fipa.client import ClientModule
from fipa.curvature import CurvatureGroup
from fipa.errors import require
from fipa.pde import PDE, PDES, forward_laplacian, get_pde
from fipa.seeding import DATA, torch_generator
from fipa.tasks.base import FederatedTask

__all__ = [
    "PINNData",
    "PINNModule",
    "PINNTask",
    "make_test_points",
    "sample_boundary",
    "sample_collocation",
    "strip_owner",
]

TEST_STREAM = 1  # sub-stream of DATA for random test points, so they never shift the training points
LAPLACIAN_MODES = ("auto", "forward", "autograd")


# --------------------------------------------------------------------------------------------- sampling
def strip_owner(x1: Tensor, edges: Sequence[float]) -> Tensor:
    """Client index of each point from its first coordinate: strip m is [edges[m], edges[m+1]) (the last is
    closed), so x_1 = 0 goes to the first client and x_1 = 1 to the last."""
    inner = torch.tensor(list(edges[1:-1]), dtype=x1.dtype)
    return torch.searchsorted(inner, x1.contiguous(), right=True)


def sample_collocation(lo: float, hi: float, dim: int, n: int, generator: torch.Generator, dtype) -> Tensor:
    """n uniform points of the strip [lo, hi] x [0, 1]^(d-1)."""
    x = torch.rand(n, dim, generator=generator, dtype=dtype)
    x[:, 0] = lo + (hi - lo) * x[:, 0]
    return x


def _split_count(n: int, widths: Sequence[float]) -> list[int]:
    """n split proportionally to widths by largest remainder (exact total, deterministic)."""
    total = sum(widths)
    shares = [n * w / total for w in widths]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(widths)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def sample_boundary(
    dim: int, per_face: int, edges: Sequence[float], generator: torch.Generator, dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Points on the 2d faces of [0, 1]^d: (x (n, d), face (n,), owner (n,)).

    face = 2 k + s for the face x_{k+1} = s. Faces x_1 = 0 / 1 hold `per_face` points (uniform in the other
    coordinates; copies of the end point in 1-D); the other faces are stratified over the strips. The owner of
    every point is `strip_owner` of its x_1.
    """
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    xs, faces = [], []
    for axis in range(dim):
        for side in (0, 1):
            if axis == 0:
                x = torch.rand(per_face, dim, generator=generator, dtype=dtype)
            else:
                x = torch.cat(
                    [
                        sample_collocation(lo, hi, dim, count, generator, dtype)
                        for (lo, hi), count in zip(zip(edges[:-1], edges[1:]), _split_count(per_face, widths))
                    ]
                )
            x[:, axis] = float(side)
            xs.append(x)
            faces.append(torch.full((len(x),), 2 * axis + side, dtype=torch.long))
    x = torch.cat(xs)
    return x, torch.cat(faces), strip_owner(x[:, 0], edges)


def make_test_points(dim: int, n: int, generator: torch.Generator | None, dtype) -> Tensor:
    """1-D: n equispaced points of [0, 1]; 2-D with n a perfect square: a sqrt(n) x sqrt(n) grid;
    otherwise n uniform random points of [0, 1]^d."""
    if dim == 1:
        return torch.linspace(0.0, 1.0, n, dtype=dtype).unsqueeze(1)
    side = math.isqrt(n)
    if dim == 2 and side * side == n:
        axis = torch.linspace(0.0, 1.0, side, dtype=dtype)
        return torch.cartesian_prod(axis, axis)
    return torch.rand(n, dim, generator=generator, dtype=dtype)


# ------------------------------------------------------------------------------------------------ data
class PINNData(Dataset):
    """One client's full batch: collocation points and their source values, boundary points and their data.

    len() counts residuals (collocation + boundary points): the client's N_m for the server weights.
    Only the full batch can be fetched (PINN clients train full batch, as in the paper).
    """

    def __init__(self, x_pde: Tensor, source: Tensor, x_bc: Tensor, g_bc: Tensor):
        self.x_pde, self.source, self.x_bc, self.g_bc = x_pde, source, x_bc, g_bc

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x_pde, self.source, self.x_bc, self.g_bc

    def __len__(self) -> int:
        return len(self.x_pde) + len(self.x_bc)

    def __getitem__(self, index):
        if not (isinstance(index, slice) and index == slice(None)):
            raise IndexError("PINNData serves the full batch only (index slice(None))")
        return self.tensors

    def to(self, device: torch.device | str) -> PINNData:
        return PINNData(*(t.to(device) for t in self.tensors))


# ---------------------------------------------------------------------------------------------- client
class PINNModule(ClientModule):
    """PINN client: residuals from input derivatives (forward Laplacian or torch.func); GGN of
    [r_pde ; sqrt(lambda_bc) r_bc] (sum form)."""

    def __init__(self, model: nn.Module, optimizer, pde: PDE, lambda_bc: float, laplacian: str = "auto"):
        super().__init__(model, optimizer)
        self.pde = pde
        self.lambda_bc = float(lambda_bc)
        # (params, x) -> (u, grad u, Laplacian u) by forward propagation, or None for torch.func autodiff.
        self.derivatives = None if laplacian == "autograd" else forward_laplacian(model)
        require(
            laplacian != "forward" or self.derivatives is not None,
            "task.laplacian=forward needs an nn.Sequential of nn.Linear layers and Tanh/Sigmoid/SiLU activations; "
            f"got {type(model).__name__} (use task.laplacian=auto or autograd)",
        )

    # Batched fields of (params, points (n, d)) -> (n,): the training loss, vectorized over the batch.
    def network_values(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """u_theta at points x (n, d) -> (n,)."""
        return functional_call(self.model, params, (x,)).squeeze(-1)

    def operator_values(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """N[u_theta] at points x (n, d) -> (n,); the PDE residual is this minus the source f."""
        if self.derivatives is not None:
            return self.pde.operator(*self.derivatives(params, x), x)
        return self.pde.apply(lambda y: self.network_values(params, y), x)

    # The same for ONE point x (d,) -> (): the curvature code calls these under vmap over points and vjp / jvp
    # over params.
    def network_value(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return self.network_values(params, x.unsqueeze(0)).squeeze(0)

    def operator_value(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return self.operator_values(params, x.unsqueeze(0)).squeeze(0)

    def residuals(self, params: dict[str, Tensor], data: PINNData | tuple) -> tuple[Tensor, Tensor]:
        """r_pde = N[u_theta] - f at the collocation points, r_bc = u_theta - g at the boundary points."""
        x_pde, source, x_bc, g_bc = data.tensors if isinstance(data, PINNData) else data
        return self.operator_values(params, x_pde) - source, self.network_values(params, x_bc) - g_bc

    def pinn_loss(self, params: dict[str, Tensor], data) -> Tensor:
        r_pde, r_bc = self.residuals(params, data)
        return r_pde.square().mean() + self.lambda_bc * r_bc.square().mean()

    def training_loss(self, batch):
        return self.pinn_loss(dict(self.model.named_parameters()), batch)

    def curvature_groups(self, data: PINNData) -> list[CurvatureGroup]:
        """H = sum_i J_pde,i^T J_pde,i + lambda_bc sum_j J_bc,j^T J_bc,j (the paper's sum form, S = I).

        The outputs are N[u_theta] and u_theta with targets f and g, so output - target is the residual (what
        the "empirical" estimator needs); the GGN itself does not depend on the targets.
        """
        x_pde, source, x_bc, g_bc = data.tensors
        return [
            CurvatureGroup(self.operator_value, x_pde, source.unsqueeze(1), loss="mse", weight=1.0),
            CurvatureGroup(self.network_value, x_bc, g_bc.unsqueeze(1), loss="mse", weight=self.lambda_bc),
        ]


# ------------------------------------------------------------------------------------------------ task
class PINNTask(FederatedTask):
    """A registered PDE on [0, 1]^d; client m owns the strip edges[m] <= x_1 <= edges[m+1] (default: 2 clients
    split at x_1 = 0.5). Metric: relative L2 error ||u_pred - u|| / ||u|| on the test points."""

    metric = "test_rel_l2"

    def __init__(
        self,
        pde: str,
        dim: int,
        seed: int,
        points_per_client: int = 400,
        boundary_points: int = 20,
        lambda_bc: float = 10.0,
        test_points: int = 1024,
        edges: Sequence[float] = (0.0, 0.5, 1.0),
        dtype: torch.dtype = torch.float64,
        laplacian: str = "auto",
    ):
        super().__init__(batch_size=None)  # full batch
        require(isinstance(pde, str), f"task.pde must be a string, one of {', '.join(sorted(PDES))}; got {pde!r}")
        require(isinstance(dim, int) and dim >= 1, f"task.dim must be an integer >= 1, got {dim!r}")
        self.pde = get_pde(pde, dim)
        require(
            points_per_client >= 1,
            f"task.points_per_client (collocation points per client) must be >= 1, got {points_per_client}",
        )
        require(
            boundary_points >= 1, f"task.boundary_points (points per boundary face) must be >= 1, got {boundary_points}"
        )
        require(lambda_bc >= 0 and math.isfinite(lambda_bc), f"task.lambda_bc must be >= 0, got {lambda_bc}")
        require(test_points >= 1, f"task.test_points must be >= 1, got {test_points}")
        require(
            laplacian in LAPLACIAN_MODES,
            f"task.laplacian must be one of {', '.join(LAPLACIAN_MODES)}, got {laplacian!r}",
        )
        edges = [float(e) for e in edges]
        require(
            len(edges) >= 2
            and edges[0] == 0.0
            and edges[-1] == 1.0
            and all(a < b for a, b in zip(edges[:-1], edges[1:])),
            f"task.edges must increase strictly from 0 to 1, got {edges}",
        )
        self.dim, self.edges, self.lambda_bc, self.laplacian = dim, edges, float(lambda_bc), laplacian
        self.input_dim, self.output_dim = dim, 1

        generator = torch_generator(seed, DATA)
        x_bc, self.boundary_faces, self.boundary_owner = sample_boundary(dim, boundary_points, edges, generator, dtype)
        self.boundary_x = x_bc
        g_bc = self.pde.exact(x_bc)
        self.datasets = []
        for m, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            x_pde = sample_collocation(lo, hi, dim, points_per_client, generator, dtype)
            mine = self.boundary_owner == m
            self.datasets.append(PINNData(x_pde, self.pde.source(x_pde), x_bc[mine], g_bc[mine]))
        self.test_x = make_test_points(dim, test_points, torch_generator(seed, DATA, TEST_STREAM), dtype)
        self.test_u = self.pde.exact(self.test_x)

    def build_module(self, model: nn.Module, optimizer) -> PINNModule:
        return PINNModule(model, optimizer, self.pde, self.lambda_bc, self.laplacian)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        error = model(self.test_x).squeeze(-1) - self.test_u
        return {
            "test_rel_l2": (error.norm() / self.test_u.norm()).item(),
            "test_max_abs": error.abs().max().item(),
        }

    # ------------------------------------------------------------------------------------------ artifacts
    def save_artifacts(self, model: nn.Module, output_dir) -> None:
        """1-D: solution.png (prediction vs exact, client strips shaded); 2-D: error_map.png (exact, predicted,
        |error|); d >= 3: error_map.png of the slice x_3 = ... = x_d = 0.5."""
        from fipa.plotting import save_predictions

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            x = self.plot_points()
            strips = [
                ((lo,) + (0.0,) * (self.dim - 1), (hi,) + (1.0,) * (self.dim - 1))
                for lo, hi in zip(self.edges[:-1], self.edges[1:])
            ]
            save_predictions(output_dir / "predictions.npz", x, self.pde.exact(x), model(x), strips)
            if self.dim == 1:
                self._plot_1d(model, output_dir / "solution.png")
            else:
                self._plot_map(model, output_dir / "error_map.png")

    def plot_points(self, resolution: int = 128) -> Tensor:
        """1-D: the test points (at least 1024 equispaced); d >= 2: a grid over (x_1, x_2), other coordinates 0.5."""
        if self.dim == 1:
            return self.test_x if len(self.test_x) >= 256 else make_test_points(1, 1024, None, self.test_x.dtype)
        axis = torch.linspace(0.0, 1.0, resolution, dtype=self.test_x.dtype)
        grid = torch.cartesian_prod(axis, axis)  # (x1, x2), x2 fastest
        x = torch.full((len(grid), self.dim), 0.5, dtype=grid.dtype)
        x[:, :2] = grid
        return x

    def _plot_1d(self, model: nn.Module, path: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        x = self.plot_points()
        exact, pred = self.pde.exact(x), model(x).squeeze(-1)
        fig = Figure(figsize=(7, 5.5))
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
        for ax in (top, bottom):
            for m, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:])):
                label = f"client {m}" if ax is top else None
                ax.axvspan(lo, hi, color=colors[m % len(colors)], alpha=0.12, lw=0, label=label)
        top.plot(x[:, 0], exact, "k-", lw=2, label="exact")
        top.plot(x[:, 0], pred, "r--", lw=1.5, label="PINN")
        top.set_ylabel("u")
        top.set_title(f"{self.pde.name}: {self.pde.equation}   rel. L2 = {self.evaluate(model)['test_rel_l2']:.2e}")
        top.legend(loc="best", fontsize=8)
        bottom.semilogy(x[:, 0], (pred - exact).abs().clamp_min(1e-16), "r-", lw=1)
        bottom.set_ylabel("|u_pred - u|")
        bottom.set_xlabel("x")
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def _plot_map(self, model: nn.Module, path: Path, resolution: int = 128) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        x = self.plot_points(resolution)
        exact = self.pde.exact(x).reshape(resolution, resolution).T  # rows: x2, columns: x1
        pred = model(x).squeeze(-1).reshape(resolution, resolution).T
        fig = Figure(figsize=(13, 4))
        FigureCanvasAgg(fig)
        panels = fig.subplots(1, 3)
        extent = (0.0, 1.0, 0.0, 1.0)
        vmin, vmax = float(exact.min()), float(exact.max())
        for ax, values, title, kw in (
            (panels[0], exact, "exact u", {"vmin": vmin, "vmax": vmax}),
            (panels[1], pred, "PINN", {"vmin": vmin, "vmax": vmax}),
            (panels[2], (pred - exact).abs(), "|error|", {"cmap": "magma"}),
        ):
            image = ax.imshow(values, origin="lower", extent=extent, aspect="equal", **kw)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            for edge in self.edges[1:-1]:
                ax.axvline(edge, color="w", ls="--", lw=1)
            ax.set_title(title)
            ax.set_xlabel("x_1")
            ax.set_ylabel("x_2")
        where = "" if self.dim == 2 else f" (slice x_3..x_{self.dim} = 0.5)"
        error = self.evaluate(model)["test_rel_l2"]
        fig.suptitle(f"{self.pde.name}, d = {self.dim}{where}; test rel. L2 = {error:.2e}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
