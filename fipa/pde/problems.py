"""The registry of PDE problems: an operator N[u] and an exact solution; the source is f = N[u_exact].

A problem is  N[u](x) = f(x) in [0, 1]^d,  u = u_exact on the boundary. Adding one means writing its operator
(in terms of u, grad u, Laplacian u and x, elementwise over a batch of points) and its exact solution (batched:
(n, d) -> (n,)), and registering them::

    register(PDE(
        name="helmholtz",
        equation="-Laplace u - 16 u = f,  u = prod_i sin(pi x_i)",
        operator=lambda u, grad, lap, x: -lap - 16.0 * u,
        solution=lambda x: torch.sin(math.pi * x).prod(-1),
    ))

The source f and the Dirichlet data come from the exact solution by automatic differentiation (`PDE.source`),
so they cannot disagree with the operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fipa.errors import ConfigError
from fipa.pde.operators import value_grad_laplacian

__all__ = ["PDE", "PDES", "get_pde", "register"]

# operator(u, grad_u, laplacian_u, x) -> N[u](x) for a batch of n points; shapes (n,), (n, d), (n,), (n, d) -> (n,)
Operator = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PDE:
    name: str
    operator: Operator
    solution: Callable[[Tensor], Tensor]  # exact u at points x (n, d) -> (n,)
    dims: tuple[int, ...] | None = None  # dimensions the exact solution is written for; None: any d >= 1
    equation: str = ""

    def supports(self, dim: int) -> bool:
        return dim >= 1 and (self.dims is None or dim in self.dims)

    def apply(self, u: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """N[u] at points x (n, d) -> (n,), for any field u: (n, d) -> (n,) that treats points independently
        (a network, the exact solution ...); derivatives by torch.func (fipa.pde.operators)."""
        return self.operator(*value_grad_laplacian(u, x), x)

    def exact(self, x: Tensor) -> Tensor:
        """u_exact at points x (n, d) -> (n,)."""
        return self.solution(x)

    def source(self, x: Tensor) -> Tensor:
        """f = N[u_exact] at points x (n, d) -> (n,), by automatic differentiation of the exact solution."""
        return self.apply(self.solution, x)


PDES: dict[str, PDE] = {}


def register(pde: PDE) -> PDE:
    if pde.name in PDES:
        raise ValueError(f"a PDE named {pde.name!r} is already registered")
    PDES[pde.name] = pde
    return pde


def get_pde(name: str, dim: int | None = None) -> PDE:
    """The registered problem `name`; ConfigError (listing the accepted names / dimensions) otherwise."""
    if name not in PDES:
        raise ConfigError(f"task.pde must be one of {', '.join(sorted(PDES))}, got {name!r}")
    pde = PDES[name]
    if dim is not None and not pde.supports(dim):
        accepted = "any d >= 1" if pde.dims is None else ", ".join(str(d) for d in pde.dims)
        raise ConfigError(f"task.dim={dim} is not supported by pde {name!r}; accepted: {accepted}")
    return pde


# ----------------------------------------------------------------------------------- the paper's problems
PI = math.pi

register(
    PDE(
        name="poisson",
        equation="-Laplace u = f,  u = sum_i sin(pi x_i)",
        operator=lambda u, grad, lap, x: -lap,
        solution=lambda x: torch.sin(PI * x).sum(-1),
    )
)
register(
    PDE(
        name="allen_cahn",
        equation="-u'' + u^3 - u = f,  u = sin(pi x)",
        operator=lambda u, grad, lap, x: -lap + u**3 - u,
        solution=lambda x: torch.sin(PI * x[:, 0]),
        dims=(1,),
    )
)
register(
    PDE(
        name="bratu",
        equation="-u'' - exp(u) = f,  u = x (1 - x)",
        operator=lambda u, grad, lap, x: -lap - torch.exp(u),
        solution=lambda x: x[:, 0] * (1 - x[:, 0]),
        dims=(1,),
    )
)
register(
    PDE(
        name="fisher_kpp",
        equation="-u'' + u (1 - u) = f,  u = x^2 (1 - x)",
        operator=lambda u, grad, lap, x: -lap + u * (1 - u),
        solution=lambda x: x[:, 0] ** 2 * (1 - x[:, 0]),
        dims=(1,),
    )
)
register(
    PDE(
        name="reaction_diffusion",
        equation="-u'' + u^2 = f,  u = sin(2 pi x)",
        operator=lambda u, grad, lap, x: -lap + u**2,
        solution=lambda x: torch.sin(2 * PI * x[:, 0]),
        dims=(1,),
    )
)
