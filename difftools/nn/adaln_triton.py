"""Triton kernels behind :mod:`difftools.nn.fused` (imported lazily; needs ``triton``).

Tokens are rows of a contiguous [B * N, D] matrix; the per-sample vectors (shift, scale, gate) are
rows of [B, D] matrices with a row stride of their own (they are column slices of the adaLN Linear's
[B, 6 D] output). A program owns one sample b and a block of rows of it, so it loads its sample's
vectors once, and in the backward pass it can sum d shift, d scale and d gate over its rows in
registers: one partial sum per program instead of one per row.

Forward (one read of x and branch, one write of x' and y):

    x'  = x + gate * branch            (HAS_RES; rounded to x's dtype, as the residual stream stores it)
    y   = (x' - mean) * rstd * (1 + scale) + shift,   rstd = 1 / sqrt(var + eps)

with ``1 + scale`` rounded to scale's dtype first, exactly as ``x * (1 + scale) + shift`` computes it
when scale is a bf16 tensor (the DiT reference and :func:`difftools.nn.fused.modulate`).

Backward, with g = dL/dy and G = dL/dx' (the gradient arriving from the next residual update):

    xhat = (x' - mean) * rstd,   gh = g * (1 + scale)
    dx'  = G + rstd * (gh - mean_D(gh) - xhat * mean_D(gh * xhat))
    d shift = sum_N g,   d scale = sum_N g * xhat,   d branch = gate * dx',   d gate = sum_N dx' * branch

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors
(Triton's interpreter; how the tests check them on a machine without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adaln_fwd(X, GATE, BRANCH, SHIFT, SCALE, XOUT, Y, MEAN, RSTD,
               N, D, stride_gate, stride_shift, stride_scale, eps,
               HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    row_ids = b.to(tl.int64) * N + rows
    offs = row_ids[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        g = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
        br = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
        xq = (x + g[None, :] * br).to(XOUT.dtype.element_ty)
        tl.store(XOUT + offs, xq, mask=mask)
        x = xq.to(tl.float32)  # the norm sees the stored (rounded) residual stream
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(SHIFT + b * stride_shift + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    one_plus = (sc + 1.0).to(SCALE.dtype.element_ty).to(tl.float32)
    y = xc * rstd[:, None] * one_plus[None, :] + sh[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row_ids, mean, mask=rmask)
    tl.store(RSTD + row_ids, rstd, mask=rmask)


@triton.jit
def _adaln_bwd(DY, DXOUT, XOUT, GATE, BRANCH, SCALE, MEAN, RSTD, DX, DBRANCH, PSHIFT, PSCALE, PGATE,
               N, D, stride_gate, stride_scale, rows_per_prog,
               HAS_RES: tl.constexpr, HAS_DXOUT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    sc = tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    one_plus = (sc + 1.0).to(SCALE.dtype.element_ty).to(tl.float32)
    if HAS_RES:
        g = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = chunk * rows_per_prog
    for start in range(first, first + rows_per_prog, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        row_ids = b.to(tl.int64) * N + rows
        offs = row_ids[:, None] * D + cols[None, :]
        mean = tl.load(MEAN + row_ids, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + row_ids, mask=rmask, other=0.0)
        x = tl.load(XOUT + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        acc_shift += tl.sum(dy, axis=0)
        acc_scale += tl.sum(dy * xhat, axis=0)
        gh = dy * one_plus[None, :]
        c_xhat = tl.sum(gh * xhat, axis=1) / D
        c_mean = tl.sum(gh, axis=1) / D
        dx = (gh - xhat * c_xhat[:, None] - c_mean[:, None]) * rstd[:, None]
        if HAS_DXOUT:
            dx += tl.load(DXOUT + offs, mask=mask, other=0.0).to(tl.float32)
        dx = tl.where(mask, dx, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            br = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
            acc_gate += tl.sum(dx * br, axis=0)
            tl.store(DBRANCH + offs, (dx * g[None, :]).to(DBRANCH.dtype.element_ty), mask=mask)
    part = (b.to(tl.int64) * tl.num_programs(1) + chunk) * D + cols
    tl.store(PSHIFT + part, acc_shift, mask=cmask)
    tl.store(PSCALE + part, acc_scale, mask=cmask)
    if HAS_RES:
        tl.store(PGATE + part, acc_gate, mask=cmask)


def _block_sizes(d: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_D columns, warps): ~4096 elements per tile (16 KB of fp32 registers)."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, 4096 // block_d))
    warps = 4 if block_d <= 512 else 8
    return block_m, block_d, warps


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter (tests): a small grid


def forward(x, gate, branch, shift, scale, eps: float, out_dtype: torch.dtype):
    """Launch the forward kernel. x [B, N, D] contiguous; gate/shift/scale [B, D] with unit column
    stride; branch like x or None (then gate is ignored). Returns (x_out or None, y, mean, rstd)."""
    B, N, D = x.shape
    has_res = branch is not None
    x_out = torch.empty_like(x) if has_res else None
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(B, N, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_m, block_d, warps = _block_sizes(D)
    grid = (B, triton.cdiv(N, block_m))
    _adaln_fwd[grid](
        x, gate if has_res else x, branch if has_res else x, shift, scale, x_out if has_res else x, y,
        mean, rstd, N, D, gate.stride(0) if has_res else 0, shift.stride(0), scale.stride(0), eps,
        HAS_RES=has_res, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return x_out, y, mean, rstd


def backward(dy, dx_out, x_out, gate, branch, scale, mean, rstd, param_dtypes):
    """Launch the backward kernel; returns (dx, dbranch or None, dgate or None, dshift, dscale).
    ``param_dtypes`` = (gate, shift, scale) dtypes of the gradients returned for them."""
    B, N, D = x_out.shape
    has_res = branch is not None
    dx = torch.empty_like(x_out)
    dbranch = torch.empty_like(branch) if has_res else None
    block_m, block_d, warps = _block_sizes(D)
    # ~16 programs per multiprocessor (several waves at 2 resident programs per SM, so the last,
    # partial wave costs little), each summing a whole number of row blocks
    chunks = max(1, min(triton.cdiv(N, block_m), triton.cdiv(16 * _sm_count(x_out.device), B)))
    rows_per_prog = triton.cdiv(triton.cdiv(N, chunks), block_m) * block_m
    chunks = triton.cdiv(N, rows_per_prog)
    partial = torch.empty(3 if has_res else 2, B, chunks, D, dtype=torch.float32, device=x_out.device)
    _adaln_bwd[(B, chunks)](
        dy, dx_out if dx_out is not None else dy, x_out, gate if has_res else scale,
        branch if has_res else dy, scale, mean, rstd, dx, dbranch if has_res else dx,
        partial[0], partial[1], partial[2] if has_res else partial[1],
        N, D, gate.stride(0) if has_res else 0, scale.stride(0), rows_per_prog,
        HAS_RES=has_res, HAS_DXOUT=dx_out is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    gate_dtype, shift_dtype, scale_dtype = param_dtypes
    # one fresh tensor per gradient (custom ops may not return views of one another)
    dgate = partial[2].sum(1).to(gate_dtype) if has_res else None
    return dx, dbranch, dgate, partial[0].sum(1).to(shift_dtype), partial[1].sum(1).to(scale_dtype)
