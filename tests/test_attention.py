"""attention(): backends agree with the written-out formula; missing xformers is a clear error."""

from __future__ import annotations

import pytest
import torch

import difftools.nn.attention as attn_mod
from difftools.nn.attention import attention


def _qkv(b=2, h=3, n=17, d=16, dtype=torch.float32, device="cpu", strided=True):
    if strided:  # the views DiT produces: one fused qkv tensor permuted, not contiguous
        qkv = torch.randn(b, n, 3, h, d, dtype=dtype, device=device).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)
    return tuple(torch.randn(b, h, n, d, dtype=dtype, device=device) for _ in range(3))


def _reference(q, k, v, scale):
    """softmax(q k^T * scale) v in float64, one (batch, head) at a time."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T * scale
            out[b, h] = torch.softmax(s, -1) @ v[b, h]
    return out


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_cpu_backends_match_reference_fp32(backend):
    q, k, v = _qkv()
    out = attention(q, k, v, backend=backend)
    ref = _reference(q, k, v, 16**-0.5)
    assert out.shape == (2, 3, 17, 16)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


def test_custom_scale_is_used():
    q, k, v = _qkv(strided=False)
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, backend=backend, scale=0.05)
        torch.testing.assert_close(out.double(), _reference(q, k, v, 0.05), atol=2e-6, rtol=1e-5)
    # a different scale gives a different answer (the argument is not ignored)
    assert (attention(q, k, v, "math", scale=0.05) - attention(q, k, v, "math")).abs().max() > 1e-3


def test_sdpa_math_gradients_agree_cpu():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(strided=False))
    g = torch.randn(2, 3, 17, 16)
    grads = {}
    for backend in ("sdpa", "math"):
        (attention(q, k, v, backend) * g).sum().backward()
        grads[backend] = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(grads["sdpa"], grads["math"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_uniform_attention_averages_values():
    # q = 0 makes every score equal, so each output row is the mean of v over tokens
    q = torch.zeros(1, 1, 5, 4)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, backend)
        torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(v), atol=1e-6, rtol=1e-6)


def test_auto_on_cpu_is_sdpa_without_measuring():
    q, k, v = _qkv()
    before = dict(attn_mod._AUTO_CHOICE)
    assert attn_mod.choose_backend(q, k, v) == "sdpa"
    assert torch.equal(attention(q, k, v, "auto"), attention(q, k, v, "sdpa"))
    assert attn_mod._AUTO_CHOICE == before


def test_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash3")
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        attention(q[0], k[0], v[0], backend="sdpa")


def test_missing_xformers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attn_mod, "_probe_xformers", lambda: None)
    monkeypatch.setattr(attn_mod, "_XFORMERS_ERROR", "ModuleNotFoundError: No module named 'xformers'")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"pip install 'difftools\[xformers\]'") as err:
        attention(q, k, v, backend="xformers")
    assert "No module named 'xformers'" in str(err.value)
    assert "xformers" not in attn_mod.available_backends("cuda")
    assert attn_mod.available_backends("cpu") == ["sdpa", "math"]


def test_gpu_only_backends_refuse_cpu_tensors(monkeypatch):
    monkeypatch.setattr(attn_mod, "_probe_xformers", lambda: object())
    q, k, v = _qkv()
    for backend in ("xformers", "cudnn"):
        with pytest.raises(RuntimeError, match="needs CUDA"):
            attention(q, k, v, backend=backend)


# ----------------------------------------------------------------------------------------- CUDA
def _bf16_close(a, b):
    # bf16 keeps 8 mantissa bits: relative error ~ 2^-8 per element; outputs here are O(1)
    err = (a.float() - b.float()).abs().max().item()
    assert err < 2e-2, err


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4, 6, 256, 64), (2, 16, 256, 72), (2, 12, 1024, 64)])
def test_cuda_sdpa_math_agree_bf16(shape):
    b, h, n, d = shape
    q, k, v = _qkv(b, h, n, d, dtype=torch.bfloat16, device="cuda")
    ref = attention(q.float(), k.float(), v.float(), "math")
    for backend in ("sdpa", "math", "auto"):
        _bf16_close(attention(q, k, v, backend), ref)


@pytest.mark.cuda
def test_cuda_cudnn_agrees_bf16():
    if not attn_mod.cudnn_attention_available():
        pytest.skip("this PyTorch build has no cuDNN attention")
    q, k, v = _qkv(8, 12, 256, 64, dtype=torch.bfloat16, device="cuda")
    try:
        out = attention(q, k, v, "cudnn")
    except RuntimeError as err:
        pytest.skip(f"cuDNN attention cannot run here: {str(err).splitlines()[0]}")
    _bf16_close(out, attention(q.float(), k.float(), v.float(), "math"))


@pytest.mark.cuda
def test_cuda_xformers_agrees_bf16_forward_and_backward():
    pytest.importorskip("xformers.ops", reason="xformers not installed on this GPU machine")
    q, k, v = (
        t.detach().requires_grad_(True) for t in _qkv(8, 6, 256, 64, dtype=torch.bfloat16, device="cuda")
    )
    g = torch.randn(8, 6, 256, 64, device="cuda", dtype=torch.bfloat16)
    results = {}
    for backend in ("sdpa", "xformers"):
        out = attention(q, k, v, backend)
        (out.float() * g.float()).sum().backward()
        results[backend] = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(results["sdpa"], results["xformers"], strict=True):
        scale = max(1.0, b.float().abs().max().item())
        assert (a.float() - b.float()).abs().max().item() / scale < 2e-2


@pytest.mark.cuda
def test_cuda_auto_measures_once_and_caches(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_AUTO_CHOICE", {})
    q, k, v = _qkv(4, 6, 200, 64, dtype=torch.bfloat16, device="cuda")
    with caplog.at_level("INFO", logger="difftools.nn.attention"):
        first = attn_mod.choose_backend(q, k, v)
        # same shape class (token count rounds up to 256): no second measurement, no second log line
        q2, k2, v2 = _qkv(4, 6, 256, 64, dtype=torch.bfloat16, device="cuda")
        second = attn_mod.choose_backend(q2, k2, v2)
    assert first == second and first in ("sdpa", "cudnn", "xformers")
    assert len([r for r in caplog.records if "attention auto for shape" in r.message]) == 1
    assert len(attn_mod._AUTO_CHOICE) == 1
