"""PDE problems for the PINN task: pointwise differential operators and the registry of problems."""

from fipa.pde.operators import forward_laplacian, value_grad_hessian_diagonal, value_grad_laplacian
from fipa.pde.problems import PDE, PDES, get_pde, register

__all__ = [
    "PDE",
    "PDES",
    "forward_laplacian",
    "get_pde",
    "register",
    "value_grad_hessian_diagonal",
    "value_grad_laplacian",
]
