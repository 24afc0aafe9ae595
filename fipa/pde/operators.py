"""Derivatives of a scalar field w.r.t. its input by automatic differentiation (torch.func).

`value_grad_laplacian(u, x)` takes a batch of points x (n, d) and a field u: (n, d) -> (n,) that treats the
points independently (u(x)_i depends on x_i only, as any pointwise network does: an MLP, no batch statistics).
Then the gradient of sum_i u(x)_i w.r.t. x is the per-point gradient, and the Hessian diagonals come from one
more reverse sweep of that gradient, vectorized over the d unit directions with vmap. A single point is the
batch x[None]; the functions compose with further torch.func transforms (vmap over points, vjp / jvp over the
network parameters), which is what the curvature code applies to them.

Measured on the paper's MLP [d,32,32,32,1], float64, one thread, loss + backward over the parameters:
reverse-over-reverse on the batch costs about the same as torch.autograd double backward (d=1: 3.5 vs 3.0 ms
for 400 points; d=5: 117 vs 100 ms for 4000 points) and 1.6-2.7x less than vmap over points of
jacfwd(jacrev(u)) (d=1: 9.3 ms, d=5: 192 ms), whose per-point transforms cost more than they vectorize.

For the networks PINNs use (a stack of Linear layers and smooth elementwise activations) `forward_laplacian`
is faster still: it pushes (value, input Jacobian, Laplacian) through the layers in one forward pass, so that
training needs only a first-order backward (the "forward Laplacian" of Li et al., 2023). The ratios against
reverse-over-reverse are measured by benchmarks/bench_pinn.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

__all__ = ["forward_laplacian", "value_grad_hessian_diagonal", "value_grad_laplacian"]


def value_grad_hessian_diagonal(u: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u(x) (n,), grad u (n, d) and the Hessian diagonal d^2u/dx_k^2 (n, d) at points x (n, d).

    One forward and two reverse sweeps: the network is evaluated once (its value rides along as aux).
    """

    def summed(y: Tensor):
        value = u(y)
        return value.sum(), value

    grad_and_value = grad(summed, has_aux=True)  # y -> (per-point gradients (n, d), values (n,))
    gradient, hvp, value = vjp(grad_and_value, x, has_aux=True)  # type: ignore[misc]  # (out, vjp_fn, aux)
    n, d = x.shape
    if d == 1:
        (diagonal,) = hvp(torch.ones_like(x))
    else:
        directions = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1).expand(d, n, d)
        (rows,) = vmap(hvp)(directions)  # rows[k, i] = Hessian_i e_k
        diagonal = rows.diagonal(dim1=0, dim2=2)  # (n, d)
    return value, gradient, diagonal


def value_grad_laplacian(u: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u(x) (n,), grad u (n, d) and the Laplacian (n,) at points x (n, d) (u must treat points independently)."""
    value, gradient, diagonal = value_grad_hessian_diagonal(u, x)
    return value, gradient, diagonal.sum(-1)


# ------------------------------------------------------------------------------------------ forward Laplacian
# An elementwise activation s as (s(z), s'(z), s''(z)), each written in terms of values already computed.
def _tanh(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(z)
    slope = 1 - t * t
    return t, slope, -2 * t * slope


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    slope = s * (1 - s)
    return s, slope, slope * (1 - 2 * s)


def _silu(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    ds = s * (1 - s)
    return z * s, s + z * ds, ds * (2 + z * (1 - 2 * s))


ACTIVATION_DERIVATIVES = {nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.SiLU: _silu}


def forward_laplacian(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor], tuple[Tensor, Tensor, Tensor]] | None:
    """(params, x (n, d)) -> (u (n,), grad u (n, d), Laplacian (n,)) of a single-output `model`, by forward
    propagation of the derivatives, or None when the model is not an nn.Sequential of nn.Linear layers and the
    activations of ACTIVATION_DERIVATIVES (callers then fall back to `value_grad_laplacian`).

    Through z = W h + b the input Jacobian and Laplacian map linearly (J -> J W^T, L -> L W^T); through
    a = s(z) they become s'(z) J and s'(z) L + s''(z) |J|^2 (column norms over the d input directions).
    `params` maps the model's parameter names to tensors, as for torch.func.functional_call.
    """
    if not isinstance(model, nn.Sequential) or not any(isinstance(m, nn.Linear) for m in model):
        return None
    steps: list[tuple[str, Callable | None]] = []
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            steps.append((name, None))
        elif type(layer) in ACTIVATION_DERIVATIVES:
            steps.append((name, ACTIVATION_DERIVATIVES[type(layer)]))
        else:
            return None

    def value_grad_laplacian_forward(params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, d = x.shape
        # Before the first layer: h = x, dh/dx = I, Laplacian 0. The first Linear makes J = W^T for every point,
        # so it is kept unbatched (d, width) until an activation makes it point-dependent.
        h, jac, lap = x, None, None
        for name, activation in steps:
            if activation is None:
                weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
                h = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
                jac = weight.T if jac is None else jac @ weight.T
                lap = None if lap is None else lap @ weight.T
            else:
                if jac is None:  # an activation on the raw input
                    jac = torch.eye(d, dtype=x.dtype, device=x.device)
                h, slope, curve = activation(h)
                bend = curve * jac.square().sum(-2)  # s''(z) sum_k (dz/dx_k)^2
                lap = bend if lap is None else slope * lap + bend
                jac = slope.unsqueeze(-2) * jac
        if jac is None or jac.dim() == 2:  # a purely affine model
            jac = (torch.eye(d, dtype=x.dtype, device=x.device) if jac is None else jac).expand(n, d, h.shape[-1])
        if lap is None:
            lap = torch.zeros_like(h)
        return h.squeeze(-1), jac.squeeze(-1), lap.squeeze(-1)

    return value_grad_laplacian_forward
