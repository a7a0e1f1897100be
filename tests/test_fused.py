"""Fused adaLN kernels (difftools.nn.fused): the torch path, the chained DiT forward, errors; the
Triton kernels themselves in the interpreter (a subprocess running tests/kernels_interpreted.py) and
on the GPU (cuda-marked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftools.models.dit import DiT
from difftools.nn import fused
from tests.adaln_cases import chain, make_inputs, rel

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernels_in_triton_interpreter():
    """The Triton kernels on CPU tensors (tests/kernels_interpreted.py: fp32 and bf16 against the torch
    reference, bf16 residual stream, partial blocks, multi-block backward, opcheck, a whole DiT), in a
    process started with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "kernels_interpreted.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "skipped" not in summary and "failed" not in summary and " passed" in summary, summary


def test_chained_forward_equals_block_by_block_forward():
    """DiT.forward computes the modulations up front and fuses each norm with the preceding residual
    update; with the torch kernels that is bit-for-bit the original per-block computation."""
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                num_classes=10, norm_kernels="torch").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([3, 10])
    out, hidden = model(x, t, y, return_hidden=2)
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    states = []
    for block in model.blocks:
        h = block(h, c)
        states.append(h)
    expected = model.unpatchify(model.final_layer(h, c))
    assert torch.equal(out, expected)
    assert torch.equal(hidden, states[1])
    # the per-block path FSDP2 takes (each unit's weights are gathered in its own forward) is that
    # same computation
    h0 = model.x_embedder(x) + model.pos_embed
    per_block, per_block_hidden = model._forward_per_block(h0, c, return_hidden=2, use_ckpt=False)
    assert torch.equal(per_block, expected) and torch.equal(per_block_hidden, states[1])


def test_impl_choice_errors():
    x = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="unknown norm kernel implementation 'cuda'"):
        fused.resolve_impl("cuda", x)
    assert fused.resolve_impl("auto", x) == "torch"  # CPU tensors, no interpreter
    with pytest.raises(RuntimeError, match="norm_kernels='triton' cannot run here .*tensors are on cpu"):
        fused.resolve_impl("triton", x)
    with pytest.raises(ValueError, match="unknown norm_kernels 'fast'"):
        DiT(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=1, num_heads=2,
            norm_kernels="fast")


def test_shape_errors_name_the_shapes():
    x, v = torch.zeros(2, 3, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"per-sample vectors must be \[B, D\] = \[2, 4\], got \[3, 4\]"):
        fused.norm_modulate(x, v, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"branch \[2, 3, 5\] must have the tokens' shape \[2, 3, 4\]"):
        fused.residual_norm_modulate(x, v, torch.zeros(2, 3, 5), v, v)
    with pytest.raises(ValueError, match=r"expected tokens \[B, N, D\], got shape \(2, 4\)"):
        fused.norm_modulate(v, v, v)


@pytest.mark.cuda
def test_triton_matches_torch_on_gpu_dit_b_shapes():
    """On the GPU, DiT-B/2 widths under bf16 autocast: fused kernels vs the torch ops (y, x' and the
    gradients within bf16 rounding of the same fp32 values)."""
    args = [t.detach().cuda().requires_grad_() for t in make_inputs(8, 256, 768)]
    ref_out, ref_grads = chain(*args, impl="torch", y_dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = chain(*args, impl="triton")
    assert torch.equal(out[0], ref_out[0])
    for a, b in zip(out[1:], ref_out[1:], strict=True):
        assert rel(a, b) < 4e-3  # 1 bf16 ulp where the fp32 values straddle a rounding boundary
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel(a, b) < 1e-2


@pytest.mark.cuda
def test_compiled_dit_with_triton_kernels_trains_like_torch_kernels():
    """torch.compile over the custom ops: the compiled DiT-S/2-width model with the fused kernels gives
    the eager torch-kernel loss and gradients to bf16 tolerance."""
    torch.manual_seed(0)
    model = DiT(input_size=16, in_channels=4, patch_size=2, hidden_size=384, depth=2, num_heads=6,
                class_dropout_prob=0.0, norm_kernels="torch").cuda()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(16, 4, 16, 16, device="cuda"), torch.rand(16, device="cuda"), \
        torch.randint(0, 10, (16,), device="cuda")

    def loss_and_grads(fn, impl):
        model.norm_kernels = impl
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, t, y).float().square().mean()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref_loss, ref_g = loss_and_grads(model, "torch")
    loss, g = loss_and_grads(torch.compile(model), "triton")
    assert rel(loss, ref_loss) < 1e-2 and rel(g, ref_g) < 3e-2
