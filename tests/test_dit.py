"""DiT: shapes, adaLN-Zero identity at init, conditioning, hidden states, config, FLOPs, compile."""

from __future__ import annotations

import math

import pytest
import torch

from difftools.models.dit import (
    DiT,
    dit_from_preset,
    gated_residual,
    modulate,
    parse_preset,
    sincos_pos_embed_2d,
)


def tiny(**kw) -> DiT:
    cfg = dict(
        input_size=16, in_channels=3, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10
    )
    cfg.update(kw)
    return DiT(**cfg)


def randomise_zero_init(model: DiT) -> DiT:
    """Give the zero-initialised layers random weights, so the network computes something non-trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(model: DiT, b: int = 4):
    x = torch.randn(b, model.in_channels, model.input_size, model.input_size)
    return x, torch.rand(b), torch.randint(0, max(model.num_classes, 1), (b,))


@pytest.mark.parametrize(
    "kw,out_ch",
    [
        (dict(), 3),
        (dict(patch_size=4, in_channels=1), 1),
        (dict(input_size=24, patch_size=8, in_channels=4), 4),
        (dict(learn_sigma=True), 6),
        (dict(num_classes=0), 3),
    ],
)
def test_output_shape(kw, out_ch):
    model = randomise_zero_init(tiny(**kw)).eval()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (4, out_ch, model.input_size, model.input_size)
    assert model.num_tokens == (model.input_size // model.patch_size) ** 2


def test_adaln_zero_blocks_are_identity_and_output_zero_at_init():
    model = tiny().train()  # train mode: label dropout active, still exact
    x, t, y = inputs(model)
    tokens = model.x_embedder(x) + model.pos_embed
    for k in range(1, model.depth + 1):
        out, hidden = model(x, t, y, return_hidden=k)
        assert torch.equal(hidden, tokens), f"block {k} changed its input at initialisation"
        assert torch.count_nonzero(out) == 0
    # the gradient still reaches the zero-initialised final layer (training can start)
    out = model(x, t, y)
    (out * torch.randn_like(out)).sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_return_hidden_is_state_after_block_k():
    model = randomise_zero_init(tiny()).eval()
    x, t, y = inputs(model)
    out, hidden = model(x, t, y, return_hidden=2)
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks[:2]:
        h = block(h, c)
    torch.testing.assert_close(hidden, h, atol=0, rtol=0)
    assert hidden.shape == (4, model.num_tokens, model.hidden_size)
    assert torch.equal(out, model(x, t, y))
    with pytest.raises(ValueError, match="1..3"):
        model(x, t, y, return_hidden=4)
    with pytest.raises(ValueError):
        model(x, t, y, return_hidden=0)


def test_conditioning_null_class_and_label_dropout():
    model = randomise_zero_init(tiny(class_dropout_prob=1.0))
    x, t, y = inputs(model)
    model.eval()
    out_y = model(x, t, y)
    out_null = model(x, t, torch.full_like(y, model.null_class))
    assert model.null_class == 10
    assert torch.equal(model(x, t, None), out_null)  # y=None means the null class
    assert (out_y - out_null).abs().max() > 1e-4  # labels matter
    assert (model(x, t.flip(0), y) - out_y).abs().max() > 1e-4  # time matters
    model.train()  # dropout probability 1: every label becomes the null class
    torch.testing.assert_close(model(x, t, y), out_null)


def test_label_dropout_rate():
    model = tiny(class_dropout_prob=0.25).train()
    y = torch.zeros(20000, dtype=torch.long)
    emb = model.y_embedder(y)
    null_row = model.y_embedder.embedding_table.weight[10]
    frac = (emb == null_row).all(1).float().mean().item()
    assert abs(frac - 0.25) < 0.015  # 4.5 sigma of a binomial(20000, 0.25) fraction


def test_unconditional_model_ignores_labels():
    model = randomise_zero_init(tiny(num_classes=0)).eval()
    x, t, _ = inputs(model)
    assert model.y_embedder is None and model.null_class == 0
    assert torch.equal(model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t))


def test_timestep_embedding_uses_1000t():
    model = tiny()
    seen = {}
    model.t_embedder.mlp[0].register_forward_pre_hook(lambda m, inp: seen.update(f=inp[0]))
    model.t_embedder(torch.tensor([0.25]))
    f = seen["f"][0]
    half = model.t_embedder.frequency_size // 2
    # feature 0 is cos(1000 t * freq_0) with freq_0 = 1; feature `half` is sin of the same angle
    assert f[0].item() == pytest.approx(math.cos(250.0), abs=1e-4)
    assert f[half].item() == pytest.approx(math.sin(250.0), abs=1e-4)
    # the lowest frequency is max_period^(-(half-1)/half)
    lowest = 10000 ** (-(half - 1) / half)
    assert f[half - 1].item() == pytest.approx(math.cos(250.0 * lowest), abs=1e-5)


def test_sincos_pos_embed_layout():
    dim, g = 32, 5
    emb = sincos_pos_embed_2d(dim, g)
    assert emb.shape == (g * g, dim)
    for row, col in [(0, 0), (1, 3), (4, 2)]:
        e = emb[row * g + col]
        # first half encodes the column, second half the row; frequency 0 = 1 rad per position
        assert e[0].item() == pytest.approx(math.sin(col), abs=1e-6)
        assert e[dim // 4].item() == pytest.approx(math.cos(col), abs=1e-6)
        assert e[dim // 2].item() == pytest.approx(math.sin(row), abs=1e-6)
        assert e[3 * dim // 4].item() == pytest.approx(math.cos(row), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)


def test_unpatchify_inverts_patch_order():
    # final layer that copies each token's pixels: unpatchify(patchify(x)) == x
    model = tiny(in_channels=2, patch_size=4)
    x = torch.randn(2, 2, 16, 16)
    p, g = 4, 4
    tokens = x.reshape(2, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 2)
    assert torch.equal(model.unpatchify(tokens), x)


def test_config_round_trip_gives_identical_model():
    model = randomise_zero_init(tiny(learn_sigma=True, attn_backend="math"))
    clone = DiT(**model.config())
    assert clone.config() == model.config()
    clone.load_state_dict(model.state_dict(), strict=True)
    x, t, y = inputs(model)
    model.eval(), clone.eval()
    assert torch.equal(clone(x, t, y), model(x, t, y))
    assert "pos_embed" not in model.state_dict()  # recomputed, not stored


def test_attention_backends_agree_in_model():
    model = randomise_zero_init(tiny()).eval()
    x, t, y = inputs(model)
    ref = model(x, t, y)
    model.set_attn_backend("math")
    assert model.config()["attn_backend"] == "math"
    torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attn_backend"):
        model.set_attn_backend("flash")


def test_gradient_checkpointing_same_gradients():
    a = randomise_zero_init(tiny(class_dropout_prob=0.0)).train()
    b = DiT(**{**a.config(), "grad_checkpointing": True}).train()
    b.load_state_dict(a.state_dict())
    x, t, y = inputs(a)
    grads = []
    for m in (a, b):
        m(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# paper (DiT, Table 4) Gflops for 256x256 images = 32x32x4 latents count a multiply-add once;
# ours counts it as 2 FLOPs, so flops_per_image() / 2e9 must match these
PAPER_GFLOPS = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64, "DiT-XL/8": 7.39}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_flops_match_paper(name):
    with torch.device("meta"):  # no memory, no init cost: flops need only the architecture
        model = dit_from_preset(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    gflops = model.flops_per_image() / 2e9
    assert gflops == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


def test_presets_and_parameter_count():
    assert parse_preset("DiT-T/4") == (192, 12, 3, 4)
    assert parse_preset("DiT-XL/2") == (1152, 28, 16, 2)
    with pytest.raises(ValueError, match="DiT-S/2"):
        parse_preset("DiT-M/2")
    with pytest.raises(ValueError):
        parse_preset("DiT-S/3")
    with torch.device("meta"):
        model = dit_from_preset("DiT-S/2", num_classes=1000, learn_sigma=True)
    # DiT paper Table 1: DiT-S/2 has 33M parameters (33.0M with its 1000-class table)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(33.0, abs=0.3)
    assert (model.hidden_size, model.depth, model.patch_size, model.num_tokens) == (384, 12, 2, 256)


def test_compiles_without_graph_breaks_cpu():
    # fullgraph=True fails on any graph break (host sync, data-dependent branch); aot_eager traces
    # forward and backward through dynamo + AOTAutograd without slow C++ code generation
    model = randomise_zero_init(tiny()).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, t, y = inputs(model)
    torch.manual_seed(3)
    out_c = compiled(x, t, y)
    torch.manual_seed(3)
    out_e = model(x, t, y)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
    out_c.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.cuda
def test_inductor_compile_bf16_cuda():
    model = randomise_zero_init(tiny(input_size=32, hidden_size=128)).cuda().eval()
    x, t, y = (a.cuda() for a in inputs(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x, t, y)
        out = torch.compile(model)(x, t, y)
    assert (out.float() - ref.float()).abs().max().item() < 3e-2 * max(1.0, ref.float().abs().max().item())


def test_fused_modulate_and_gated_residual_match_two_op_formulas():
    g = torch.Generator().manual_seed(5)
    x, branch = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    shift, scale, gate = (torch.randn(2, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(gated_residual(x, gate, branch), x + gate[:, None] * branch)
    # the residual keeps x's dtype whatever the branch's: fp32 stream + bf16 branch stays fp32 ...
    out = gated_residual(x, gate.bfloat16(), branch.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x + gate.bfloat16().float()[:, None] * branch.bfloat16().float())
    # ... and a bf16 stream stays bf16 even when the branch is fp32
    assert gated_residual(x.bfloat16(), gate, branch).dtype == torch.bfloat16


def test_lowp_residual_is_exact_in_fp32_and_bf16_under_autocast():
    model = randomise_zero_init(tiny(class_dropout_prob=0.0)).eval()
    lowp = DiT(**{**model.config(), "lowp_residual": True}).eval()
    lowp.load_state_dict(model.state_dict())
    assert lowp.config()["lowp_residual"] is True and model.config()["lowp_residual"] is False
    x, t, y = inputs(model)
    ref = model(x, t, y)
    assert torch.equal(lowp(x, t, y), ref)  # without autocast the stream is fp32 either way
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_hi, hid_hi = model(x, t, y, return_hidden=2)
        out_lo, hid_lo = lowp(x, t, y, return_hidden=2)
    assert hid_hi.dtype == torch.float32 and hid_lo.dtype == torch.bfloat16
    scale = ref.abs().max()
    err_hi = (out_hi.float() - ref).abs().max() / scale
    err_lo = (out_lo.float() - ref).abs().max() / scale
    # both are bf16-autocast accurate (~1e-2 relative); the bf16 stream rounds a few more times
    assert err_hi < 2e-2 and err_lo < 3e-2
    assert not torch.equal(out_lo, out_hi)
