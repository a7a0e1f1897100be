"""Inputs and a scalar-loss chain for the fused adaLN kernel tests (CPU interpreter and GPU alike)."""

from __future__ import annotations

import torch

from difftools.nn import fused


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(B, N, D, x_dtype=torch.float32, p_dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(x_dtype).requires_grad_()
    branch = torch.randn(B, N, D, generator=g).to(p_dtype).requires_grad_()
    # per-sample vectors as DiT makes them: column slices of one [B, 6D] adaLN output (row stride 6D)
    mod = (0.5 * torch.randn(B, 6 * D, generator=g)).to(p_dtype).requires_grad_()
    return x, branch, mod


def chain(x, branch, mod, impl, eps=1e-6, y_dtype=None, x_out_grad=True):
    """residual_norm_modulate then norm_modulate of its output, reduced to a scalar with fixed random
    weights (every output and gradient path is used)."""
    shift, scale, gate, shift2, scale2, _ = mod.chunk(6, dim=1)
    x_out, y = fused.residual_norm_modulate(x, gate, branch, shift, scale, eps, impl)
    y2 = fused.norm_modulate(x_out, shift2, scale2, eps, impl)
    if y_dtype is not None:  # the torch path's fp32 result as the next Linear would read it
        y, y2 = y.to(y_dtype), y2.to(y_dtype)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    loss = (y.float() * w).sum() + (y2.float() * w.flip(1)).sum()
    if x_out_grad:
        loss = loss + 0.3 * x_out.float().square().sum()
    grads = torch.autograd.grad(loss, (x, branch, mod))
    return (x_out, y, y2), grads
