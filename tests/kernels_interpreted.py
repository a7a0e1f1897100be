"""Fused adaLN kernels in Triton's interpreter, on CPU tensors: the kernels against the torch reference.

Run by ``tests/test_fused.py::test_kernels_in_triton_interpreter`` in a fresh process with
``TRITON_INTERPRET=1`` (the interpreter must be on before triton is first imported, so these tests
cannot share a process with the rest of the suite; collected alone they skip). The interpreter
rounds fp32 -> bf16 toward zero where the GPU rounds to nearest even; the fixture below fixes that
in the interpreter, so a bf16 value that differs from the reference is a kernel error, not the
emulator's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/test_fused.py does)", allow_module_level=True)

triton = pytest.importorskip("triton")

from difftools.models.dit import DiT  # noqa: E402
from difftools.nn import fused  # noqa: E402
from tests.adaln_cases import chain, make_inputs, rel  # noqa: E402


def _rtne_convert(original):
    """The interpreter's float converter with IEEE round-to-nearest-even for fp32 -> bf16."""
    import triton.language as tl

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            bits = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint32).astype(np.uint64)
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).reshape(data.shape)
        return original(data, src, dst, rounding_mode)

    return convert


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """The interpreter with round-to-nearest-even bf16 conversion, as on the GPU."""
    import triton.runtime.interpreter as interp

    monkeypatch.setattr(interp, "_convert_float", _rtne_convert(interp._convert_float))


@pytest.mark.parametrize("B,N,D", [(3, 10, 24), (2, 5, 40)])
def test_triton_matches_torch_fp32(interpreted, B, N, D):
    """All fp32 (no autocast): same function to fp32 round-off, forward and every gradient, for row
    counts and widths that do not fill the kernels' blocks (N % BLOCK_M != 0, D not a power of 2)."""
    args = make_inputs(B, N, D, p_dtype=torch.float32)
    ref_out, ref_grads = chain(*args, impl="torch")
    out, grads = chain(*args, impl="triton")
    for a, b in zip(out + grads, ref_out + ref_grads, strict=True):
        assert a.dtype == b.dtype
        assert rel(a, b) < 2e-6


def test_triton_matches_torch_bf16_modulation_fp32_stream(interpreted):
    """DiT under bf16 autocast: bf16 branch and modulation, fp32 residual stream, y in bf16. The
    kernel rounds exactly where the torch expression rounds (1 + scale in bf16, y once), so y, x'
    and the bf16 gradients are bit-identical; the fp32 dx differs by summation order only."""
    args = make_inputs(3, 10, 24)
    ref_out, ref_grads = chain(*args, impl="torch", y_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = chain(*args, impl="triton")
    assert out[1].dtype == torch.bfloat16  # written in the autocast dtype, as the Linear reads it
    for a, b in zip(out, ref_out, strict=True):
        assert torch.equal(a.to(b.dtype), b)
    dx, dbranch, dmod = grads
    assert rel(dx, ref_grads[0]) < 1e-6
    assert torch.equal(dbranch, ref_grads[1]) and torch.equal(dmod, ref_grads[2])


def test_triton_bf16_residual_stream_rounds_before_the_norm(interpreted):
    """lowp_residual: x' is stored in bf16 and the norm reads the stored value in fp32 (CUDA
    autocast runs layer_norm in fp32); the reference below spells that out."""
    x, branch, mod = make_inputs(2, 12, 32, x_dtype=torch.bfloat16)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    x_ref = fused.gated_residual(x, gate, branch)
    assert x_ref.dtype == torch.bfloat16
    y_ref = fused.modulate(F.layer_norm(x_ref.float(), (32,), eps=1e-6), shift, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_out, y = fused.residual_norm_modulate(x, gate, branch, shift, scale, 1e-6, "triton")
    assert torch.equal(x_out, x_ref)
    # one bf16 ulp at most: an fp32 value within round-off of a rounding boundary may round either way
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=1e-6)
    assert (y != y_ref.to(torch.bfloat16)).float().mean() < 0.01


def test_backward_over_several_row_blocks_per_program(interpreted, monkeypatch):
    """One program per sample (as for a large batch on a GPU), looping over 3 row blocks and summing
    d shift / d scale / d gate in registers across them (N = 40 leaves the last block partly masked)."""
    monkeypatch.setattr(fused._kernels(), "_sm_count", lambda device: 1)
    args = make_inputs(8, 40, 24, p_dtype=torch.float32)
    ref_out, ref_grads = chain(*args, impl="torch")
    out, grads = chain(*args, impl="triton")
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel(a, b) < 2e-6


def test_unused_residual_output_has_no_gradient_input(interpreted):
    """The final norm of a DiT: x' feeds nothing, so its gradient is None in the backward."""
    args = make_inputs(2, 6, 16, p_dtype=torch.float32)
    _, ref_grads = chain(*args, impl="torch", x_out_grad=False)
    _, grads = chain(*args, impl="triton", x_out_grad=False)
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel(a, b) < 2e-6


def test_custom_ops_pass_opcheck(interpreted):
    """Schemas, fake (meta) implementations and autograd registrations agree with the kernels: what
    torch.compile and CUDA-graph capture rely on."""
    x, branch, mod = make_inputs(2, 6, 16)
    shift, scale, gate = (t.detach().contiguous().requires_grad_() for t in mod.chunk(6, dim=1)[:3])
    torch.library.opcheck(torch.ops.difftools.residual_norm_modulate.default,
                          (x, gate, branch, shift, scale, 1e-6, torch.bfloat16))
    torch.library.opcheck(torch.ops.difftools.norm_modulate.default, (x, shift, scale, 1e-6, torch.float32))


def test_dit_with_triton_kernels_matches_torch_kernels(interpreted):
    """A whole DiT (fp32): outputs and all parameter gradients agree between the two paths."""
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=10, class_dropout_prob=0.0, norm_kernels="torch")
    for p in model.parameters():  # leave adaLN-Zero's identity start: every path must matter
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])

    def run(impl):
        model.norm_kernels = impl
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = run("torch")
    out, grads = run("triton")
    assert rel(out, ref_out) < 1e-5
    worst = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst < 1e-4


def test_compiled_dit_traces_the_kernels_in_one_graph(interpreted):
    """torch.compile(fullgraph=True) over the triton path: the custom ops (fake implementations) and
    their autograd formulas trace without a graph break; forward and gradients match eager."""
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=10, class_dropout_prob=0.0, norm_kernels="triton")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([4, 10])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        out = fn(x, t, y)
        out.square().mean().backward()
        grads.append((out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert rel(grads[1][0], grads[0][0]) < 1e-6 and rel(grads[1][1], grads[0][1]) < 1e-6
