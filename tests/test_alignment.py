"""SRA² VAE-feature alignment loss (difftools/losses/alignment.py, arXiv 2601.17830)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from difftools.losses import DenoisingLoss, build_loss
from difftools.losses.alignment import (
    AlignedLoss,
    AlignmentProjector,
    alignment_flops_overhead,
    smooth_l1,
    unpatchify,
)
from difftools.models.dit import DiT, dit_from_preset
from difftools.process import make_process


def tiny_dit(depth: int = 4) -> DiT:
    torch.manual_seed(0)
    model = DiT(
        input_size=8,
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        depth=depth,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.0,
    )
    # Give every adaLN-Zero gate a non-zero value so that gradients reach all of a block's weights
    # (at the zero init only the modulation layers would get gradient).
    for block in model.blocks:
        nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
        nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.05)
    return model


def aligned(model: DiT, depth: int = 2, weight: float = 1.0) -> AlignedLoss:
    process = make_process("flow")
    return AlignedLoss(
        DenoisingLoss(process, prediction="flow"),
        hidden_size=model.hidden_size,
        patch_size=model.patch_size,
        target_channels=4,
        depth=depth,
        weight=weight,
    )


def test_smooth_l1_values():
    beta = 0.05
    z = torch.zeros(4)
    # |r| < beta: 0.5 r^2 / beta ; |r| >= beta: |r| - beta / 2 ; mean over the 4 elements
    r = torch.tensor([0.01, -0.02, 1.0, -2.0])
    expected = (0.5 * 0.01**2 / beta + 0.5 * 0.02**2 / beta + (1.0 - 0.025) + (2.0 - 0.025)) / 4
    assert smooth_l1(r, z, beta).item() == pytest.approx(expected, rel=1e-6)


def test_unpatchify_matches_dit_layout():
    model = tiny_dit()
    tokens = torch.randn(2, model.num_tokens, model.patch_size**2 * model.out_channels)
    ours = unpatchify(tokens, model.out_channels, model.patch_size, (model.grid_size, model.grid_size))
    assert torch.equal(ours, model.unpatchify(tokens))


def test_projector_shape_and_paper_widths():
    proj = AlignmentProjector(hidden_size=384, out_channels=32, patch_size=2)
    linears = [m for m in proj.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 5 and sum(isinstance(m, nn.SiLU) for m in proj.mlp) == 4
    assert proj.dims == [384, 192, 96, 48, 48, 128]
    out = proj(torch.randn(3, 16, 384), (4, 4))
    assert out.shape == (3, 32, 8, 8)
    assert proj.flops_per_token() == 2 * (384 * 192 + 192 * 96 + 96 * 48 + 48 * 48 + 48 * 128)


def test_align_loss_zero_when_projection_equals_target():
    model = tiny_dit()
    loss = aligned(model)
    hidden = torch.randn(3, model.num_tokens, model.hidden_size)
    with torch.no_grad():
        target = loss.projector(hidden, (model.grid_size, model.grid_size))
    assert loss.align_loss(hidden, target).item() == 0.0
    # one element off by 1.0 (> beta): the mean loss is exactly (1 - beta/2) / numel
    off = target.clone()
    off[0, 0, 0, 0] += 1.0
    assert loss.align_loss(hidden, off).item() == pytest.approx((1.0 - 0.025) / target.numel(), rel=1e-4)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gradient_reaches_blocks_up_to_depth_only(depth):
    model = tiny_dit(depth=4)
    loss = aligned(model, depth=depth)
    x0 = torch.randn(2, 4, 8, 8)
    t = torch.rand(2)
    y = torch.tensor([1, 2])
    _, hidden = model(x0 + torch.randn_like(x0), t, y, return_hidden=depth)
    loss.align_loss(hidden, x0).backward()
    for i, block in enumerate(model.blocks, start=1):
        grads = [p.grad for p in block.parameters()]
        if i <= depth:
            assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0
            assert block.mlp.fc1.weight.grad.abs().sum() > 0
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), f"block {i} got gradient"
    assert model.final_layer.linear.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.projector.parameters())


def test_forward_logs_and_denoising_part_unchanged():
    model = tiny_dit()
    model.eval()  # no label dropout: both calls see the same conditioning
    loss_fn = aligned(model, depth=2, weight=0.7)
    plain = DenoisingLoss(make_process("flow"), prediction="flow")
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    total, logs = loss_fn(model, x0, y, generator=torch.Generator().manual_seed(3))
    ref, _ = plain(model, x0, y, generator=torch.Generator().manual_seed(3))
    assert {"loss_denoise", "loss_align", "loss"} <= set(logs)
    # the probe does not change what the denoising loss computes (same t, eps, forward)
    assert logs["loss_denoise"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert total.item() == pytest.approx(ref.item() + 0.7 * logs["loss_align"].item(), rel=1e-6)
    assert logs["loss_align"].item() > 0


def test_build_loss_off_by_default_and_projector_outside_model():
    model = tiny_dit()
    process = make_process("flow")
    off = build_loss({"prediction": "flow"}, model, process)
    assert isinstance(off, DenoisingLoss)
    off0 = build_loss({"prediction": "flow", "align": {"weight": 0.0, "depth": 2}}, model, process)
    assert isinstance(off0, DenoisingLoss)
    on = build_loss(
        {
            "prediction": "flow",
            "align": {"weight": 1.0, "depth": 2, "beta": 0.05, "features": "latent", "widths": [16, 8, 8, 8]},
        },
        model,
        process,
    )
    assert isinstance(on, AlignedLoss) and on.depth == 2 and on.projector.dims == [32, 16, 8, 8, 8, 16]
    model_ids = {id(p) for p in model.parameters()}
    assert all(id(p) not in model_ids for p in on.parameters())
    assert any(k.startswith("projector.") for k in on.state_dict())
    assert not any("projector" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="depth"):
        aligned(model, depth=9)(model, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))


def test_encoder_features_target_through_vae():
    """features="encoder": the target is the autoencoder's hidden map of the decoded clean latent."""
    from difftools.models.vae import build_autoencoder

    ae = build_autoencoder("identity", channels=4)
    model = tiny_dit()
    loss = AlignedLoss(
        DenoisingLoss(make_process("flow")),
        model.hidden_size,
        model.patch_size,
        target_channels=4,
        depth=1,
        features="encoder",
        vae=ae,
    )
    x0 = torch.rand(2, 4, 8, 8) * 2 - 1
    assert torch.equal(loss.target(x0), x0)
    with pytest.raises(ValueError, match="needs the autoencoder"):
        AlignedLoss(DenoisingLoss(make_process("flow")), 32, 2, 4, features="encoder")


def test_analytic_flops_overhead_dit_s2():
    """DiT-S/2 on 8x8x32 latents (TAEF2, 64px): the branch costs well under the 5 % budget."""
    model = dit_from_preset("DiT-S/2", input_size=8, in_channels=32)
    proj = AlignmentProjector(model.hidden_size, 32, model.patch_size)
    ratio = alignment_flops_overhead(model, proj)
    per_token = 2 * (384 * 192 + 192 * 96 + 96 * 48 + 48 * 48 + 48 * 128)
    assert ratio == pytest.approx(16 * per_token / model.flops_per_image())
    assert 0.001 < ratio < 0.05
