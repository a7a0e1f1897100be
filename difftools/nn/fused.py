"""adaLN-Zero's memory-bound steps fused into one pass over the tokens: gated residual, layer norm,
modulation (DiT, Peebles & Xie, arXiv 2212.09748).

Between two matmuls a DiT block does, per token row x of width D and per-sample vectors
(gate, shift, scale) from the adaLN Linear::

    x' = x + gate * branch                    gated residual update (adaLN-Zero)
    y  = LN(x') * (1 + scale) + shift         layer norm without affine, then modulation

Written as separate ops that is four passes over [B, N, D] tensors forward and more backward (the
per-sample sums d shift, d scale, d gate reduce over tokens, the layer norm's over channels);
:func:`residual_norm_modulate` does it in one kernel each way (:mod:`difftools.nn.adaln_triton`),
keeping the normalised tokens out of memory (recomputed from x', mean and rstd in the backward) and
writing y straight in the autocast dtype the next Linear reads. :class:`~difftools.models.dit.DiT`
chains it across blocks: every layer norm is fused with the residual update before it.

``impl``: ``triton`` (the kernels; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``),
``torch`` (:func:`modulate`, :func:`gated_residual` and ``F.layer_norm``: the reference the kernels
are tested against, and what ``torch.compile`` fuses by itself), ``auto`` (triton for CUDA tensors
when triton imports, else torch). The kernels are ``torch.library`` custom ops with fake
implementations and autograd formulas, so they run eager, under ``torch.compile`` and inside CUDA
graphs alike.

Numerics match the torch path: everything in fp32 registers, x' rounded to x's dtype before the norm
(a bf16 residual stream stays bf16), ``1 + scale`` rounded to scale's dtype (as the tensor expression
does), y rounded once to its output dtype (bf16 under bf16 autocast: what the next Linear would cast
the fp32 result to). Gradients of the per-sample vectors are summed in fp32 and returned in their
dtypes.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

IMPLS = ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------- torch reference
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer-norm affine: shift + x * (1 + scale), per sample ([B, D] broadcast over tokens).

    One ``addcmul`` instead of a multiply and an add: eager mode makes one pass over the [B, N, D]
    tokens instead of two (inductor fuses either form). Mixed dtypes promote (bf16 shift/scale from
    an autocast Linear with an fp32 ``x`` compute in fp32), exactly as the two-op form does.
    """
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual update x + gate * branch (gate [B, D] broadcast over tokens), in x's dtype.

    One ``addcmul``: a single pass in eager mode, and the product is not rounded to the branch's
    (bf16) dtype before the add. The result keeps x's dtype, so the residual stream's precision is
    fixed by the model (fp32 by default, see ``DiT(lowp_residual=...)``), not by the branch.
    """
    return torch.addcmul(x, gate.unsqueeze(1), branch).to(x.dtype)


def _norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), None, None, eps)


# ---------------------------------------------------------------------------------- dispatch
# looked up once, without importing triton (a module constant: torch.compile folds it)
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed here (the kernels also need CUDA tensors, or TRITON_INTERPRET=1)."""
    return _HAVE_TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """``triton`` or ``torch`` for tensors like ``x``; an error for an unknown or unusable choice."""
    if impl not in IMPLS:
        raise ValueError(f"unknown norm kernel implementation {impl!r}; choose one of {IMPLS}")
    if impl == "torch":
        return "torch"
    usable = triton_available() and (x.is_cuda or _interpreting())
    if impl == "auto":
        return "triton" if usable else "torch"
    if not usable:
        why = "triton is not installed" if not triton_available() else f"tensors are on {x.device}"
        raise RuntimeError(f"norm_kernels='triton' cannot run here ({why}): the kernels need CUDA "
                           "tensors and triton; use 'auto' (falls back to torch) or 'torch'")
    return "triton"


def _out_dtype(x: torch.Tensor, shift: torch.Tensor) -> torch.dtype:
    """What the torch path's y would be cast to by the next Linear: the autocast dtype, else the
    promoted dtype of x and the modulation."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(x.dtype, shift.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [B, D] per-sample vector with unit column stride (chunk() views qualify as they are)."""
    return t if t.stride(-1) == 1 else t.contiguous()


_KERNELS = None


def _kernels():
    """The Triton launchers (imported on first use; tests swap in an interpreted copy)."""
    global _KERNELS
    if _KERNELS is None:
        from difftools.nn import adaln_triton  # noqa: PLC0415 - needs triton, imported lazily

        _KERNELS = adaln_triton
    return _KERNELS


# ---------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("difftools::norm_modulate", mutates_args=())
def _norm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = _kernels().forward(x, None, None, shift, scale, eps, out_dtype)
    return y, mean, rstd


@_norm_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("difftools::residual_norm_modulate", mutates_args=())
def _residual_op(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor,
                 scale: torch.Tensor, eps: float, out_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().forward(x, gate, branch, shift, scale, eps, out_dtype)


@_residual_op.register_fake
def _(x, gate, branch, shift, scale, eps, out_dtype):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x), x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("difftools::norm_modulate_backward", mutates_args=())
def _norm_modulate_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, shift_dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, _, dshift, dscale = _kernels().backward(dy, None, x, None, None, scale, mean, rstd,
                                                   (None, shift_dtype, scale.dtype))
    return dx, dshift, dscale


@_norm_modulate_bwd_op.register_fake
def _(dy, x, scale, mean, rstd, shift_dtype):
    return torch.empty_like(x), scale.new_empty(scale.shape, dtype=shift_dtype), torch.empty_like(scale)


@torch.library.custom_op("difftools::residual_norm_modulate_backward", mutates_args=())
def _residual_bwd_op(dy: torch.Tensor, dx_out: torch.Tensor | None, x_out: torch.Tensor, gate: torch.Tensor,
                     branch: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     shift_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().backward(dy, dx_out, x_out, gate, branch, scale, mean, rstd,
                               (gate.dtype, shift_dtype, scale.dtype))


@_residual_bwd_op.register_fake
def _(dy, dx_out, x_out, gate, branch, scale, mean, rstd, shift_dtype):
    return (torch.empty_like(x_out), torch.empty_like(branch), torch.empty_like(gate),
            scale.new_empty(scale.shape, dtype=shift_dtype), torch.empty_like(scale))


def _norm_modulate_setup(ctx, inputs, output):
    x, shift, scale, eps, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _norm_modulate_backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _norm_modulate_bwd_op(dy.contiguous(), x, scale, mean, rstd, ctx.shift_dtype)
    return dx, dshift, dscale, None, None


def _residual_setup(ctx, inputs, output):
    _, gate, branch, shift, scale, _, _ = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, gate, branch, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _residual_backward(ctx, dx_out, dy, _dmean, _drstd):
    x_out, gate, branch, scale, mean, rstd = ctx.saved_tensors
    if dy is None:  # y unused: only the residual stream carries a gradient
        dy = torch.zeros_like(x_out)
    dx, dbranch, dgate, dshift, dscale = _residual_bwd_op(
        dy.contiguous(), None if dx_out is None else dx_out.contiguous(), x_out, gate, branch, scale, mean,
        rstd, ctx.shift_dtype)
    return dx, dgate, dbranch, dshift, dscale, None, None


_norm_modulate_op.register_autograd(_norm_modulate_backward, setup_context=_norm_modulate_setup)
_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup)


# ---------------------------------------------------------------------------------- public API
def _check(x: torch.Tensor, *vectors: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"expected tokens [B, N, D], got shape {tuple(x.shape)}")
    for v in vectors:
        if v.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"per-sample vectors must be [B, D] = {[x.shape[0], x.shape[2]]}, "
                             f"got {list(v.shape)} for tokens {list(x.shape)}")


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                  impl: str = "auto") -> torch.Tensor:
    """y = LN(x) * (1 + scale) + shift for tokens x [B, N, D] and per-sample shift, scale [B, D]."""
    _check(x, shift, scale)
    if resolve_impl(impl, x) == "torch":
        return modulate(_norm(x, eps), shift, scale)
    y, _, _ = _norm_modulate_op(x.contiguous(), _rows(shift), _rows(scale), float(eps), _out_dtype(x, shift))
    return y


def residual_norm_modulate(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, eps: float = 1e-6, impl: str = "auto"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', y): x' = x + gate * branch in x's dtype, y = LN(x') * (1 + scale) + shift (module docstring)."""
    _check(x, gate, shift, scale)
    if branch.shape != x.shape:
        raise ValueError(f"branch {list(branch.shape)} must have the tokens' shape {list(x.shape)}")
    if resolve_impl(impl, x) == "torch":
        x = gated_residual(x, gate, branch)
        return x, modulate(_norm(x, eps), shift, scale)
    x_out, y, _, _ = _residual_op(x.contiguous(), _rows(gate), branch.contiguous(), _rows(shift),
                                  _rows(scale), float(eps), _out_dtype(x, shift))
    return x_out, y
