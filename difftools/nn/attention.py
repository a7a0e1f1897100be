"""Scaled dot-product attention with interchangeable backends.

    attention(q, k, v) = softmax(q k^T * scale) v,   scale = head_dim ** -0.5   (arXiv 1706.03762)

on tensors laid out ``[batch, heads, tokens, head_dim]`` (the layout of
``torch.nn.functional.scaled_dot_product_attention``). Backends:

``sdpa``
    PyTorch's fused kernel; in bf16/fp16 on CUDA it dispatches to FlashAttention-2
    (arXiv 2307.08691), on CPU to a fused C++ kernel.
``cudnn``
    SDPA restricted to cuDNN's fused attention (CUDA only): on Hopper often faster than the
    FlashAttention-2 kernel that ``sdpa`` picks by default; an error where cuDNN cannot run the shape.
``xformers``
    ``xformers.ops.memory_efficient_attention`` (optional dependency, probed at run time). It wants
    ``[batch, tokens, heads, head_dim]``; we pass transposed *views*, so no copy is made.
``math``
    the formula above written out in PyTorch ops (softmax accumulated in fp32): the readable
    reference, slow and memory-hungry (materialises the N x N scores).
``auto``
    on CUDA, times ``sdpa``, ``cudnn`` and ``xformers`` (those available; forward + backward) once per
    *shape class*
    (device, dtype, heads, head_dim, token count rounded up to a power of two), caches the winner
    and logs one line; on CPU, or while ``torch.compile`` traces, it uses ``sdpa`` without
    measuring. Measured on an H100 (ARCHITECTURE.md): SDPA-flash is 1.4-1.7x faster than
    xformers 0.0.35 at DiT shapes, so ``auto`` normally settles on ``sdpa``.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

Backend = Literal["sdpa", "cudnn", "xformers", "math", "auto"]
BACKENDS: tuple[str, ...] = ("sdpa", "cudnn", "xformers", "math", "auto")

_XFORMERS_OPS = None  # the imported ``xformers.ops`` module once probed successfully
_XFORMERS_ERROR: str | None = None  # why the probe failed (kept for the error message)
_XFORMERS_PROBED = False

#: auto-selection cache: shape class -> chosen backend name
_AUTO_CHOICE: dict[tuple, str] = {}


def _probe_xformers():
    """Import ``xformers.ops`` once; remember the failure reason instead of raising."""
    global _XFORMERS_OPS, _XFORMERS_ERROR, _XFORMERS_PROBED
    if not _XFORMERS_PROBED:
        _XFORMERS_PROBED = True
        try:
            import xformers.ops as xops  # noqa: PLC0415 - optional dependency, imported lazily

            _XFORMERS_OPS = xops
        except Exception as err:  # ImportError, or a broken CUDA extension raising at import
            _XFORMERS_ERROR = f"{type(err).__name__}: {err}"
    return _XFORMERS_OPS


def xformers_available() -> bool:
    """True when ``xformers.ops`` imports in this environment."""
    return _probe_xformers() is not None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` here (xformers only on CUDA and only when installed)."""
    dev = torch.device(device) if device is not None else None
    on_cuda = dev is None or dev.type == "cuda"
    names = ["sdpa"]
    if on_cuda and cudnn_attention_available():
        names.append("cudnn")
    if on_cuda and xformers_available():
        names.append("xformers")
    return names + ["math"]


def _require_xformers(device: torch.device):
    xops = _probe_xformers()
    if xops is None:
        raise RuntimeError(
            "attention backend 'xformers' was requested but xformers cannot be imported "
            f"({_XFORMERS_ERROR}). Install it with `pip install 'difftools[xformers]'` or `pip install "
            "xformers` (a build matching your torch and CUDA versions; offline: `pip install <xformers "
            "wheel file>`), or choose backend='sdpa' or 'auto'."
        )
    if device.type != "cuda":
        raise RuntimeError(
            f"attention backend 'xformers' needs CUDA tensors, got device {device}; "
            "use backend='sdpa' on CPU."
        )
    return xops


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def cudnn_attention_available() -> bool:
    """True when this PyTorch build has cuDNN fused attention and CUDA is present."""
    return (torch.cuda.is_available() and torch.backends.cudnn.is_available()
            and hasattr(SDPBackend, "CUDNN_ATTENTION"))


def _cudnn(q, k, v, scale):
    if q.device.type != "cuda":
        raise RuntimeError(f"attention backend 'cudnn' needs CUDA tensors, got device {q.device}; "
                           "use backend='sdpa' on CPU.")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _xformers(q, k, v, scale):
    xops = _require_xformers(q.device)
    # [B, H, N, D] -> [B, N, H, D] as views: xformers accepts strided inputs with unit last stride.
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def _math(q, k, v, scale):
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    # softmax in fp32 (exp of bf16 logits loses the small weights), back to the input dtype for @ v
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


_IMPLS = {"sdpa": _sdpa, "cudnn": _cudnn, "xformers": _xformers, "math": _math}


def _shape_class(q: torch.Tensor, k: torch.Tensor) -> tuple:
    n_bucket = 1 << max(0, math.ceil(math.log2(max(q.shape[-2], k.shape[-2], 1))))
    return (q.device.type, q.device.index, q.dtype, q.shape[1], q.shape[-1], n_bucket)


def _time_backend(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, reps: int = 5
) -> float:
    """Median ms of one forward + backward of backend ``name`` on fresh tensors shaped like q/k/v."""
    qq, kk, vv = (torch.randn_like(t).requires_grad_(True) for t in (q, k, v))
    fn = _IMPLS[name]
    times = []
    for i in range(reps + 2):  # two warm-up runs (kernel selection, lazy init)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(qq, kk, vv, scale)
        out.sum().backward()
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> str:
    """The backend ``auto`` uses for tensors like these (measured once per shape class on CUDA)."""
    if q.device.type != "cuda":
        return "sdpa"
    key = _shape_class(q, k)
    choice = _AUTO_CHOICE.get(key)
    if choice is not None:
        return choice
    # Timing needs host synchronisation: impossible while torch.compile traces or a CUDA graph is
    # captured. There, use sdpa (the measured winner at DiT shapes) and leave the cache empty.
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "sdpa"
    candidates = ["sdpa"] + ["cudnn"] * cudnn_attention_available() + ["xformers"] * xformers_available()
    s = q.shape[-1] ** -0.5 if scale is None else scale
    ms = {}
    for name in candidates:
        try:
            with torch.enable_grad():
                ms[name] = _time_backend(name, q, k, v, s)
        except RuntimeError as err:  # e.g. cuDNN has no kernel for this shape / dtype
            log.info("attention auto: %s unusable for %s %s (%s)", name, tuple(q.shape), q.dtype,
                     str(err).splitlines()[0][:120])
    choice = min(ms, key=ms.get) if ms else "sdpa"
    log.info("attention auto for shape %s %s: %s (fwd+bwd ms: %s%s)", tuple(q.shape), q.dtype, choice,
             ", ".join(f"{n}={t:.3f}" for n, t in ms.items()),
             "" if xformers_available() else f"; xformers not importable: {_XFORMERS_ERROR}")
    _AUTO_CHOICE[key] = choice
    return choice


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend = "auto", scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v of shape [B, heads, N, head_dim]; returns [B, heads, N, head_dim].

    ``scale`` defaults to head_dim ** -0.5. ``backend`` is one of ``sdpa | xformers | math | auto``
    (see the module docstring); asking for ``xformers`` where it is not installed raises a
    RuntimeError that says how to install it.
    """
    if q.ndim != 4:
        raise ValueError(
            f"attention expects [batch, heads, tokens, head_dim] tensors, got q of shape {tuple(q.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        backend = choose_backend(q, k, v, scale)
    impl = _IMPLS.get(backend)
    if impl is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return impl(q, k, v, scale)
