"""facebookresearch/DiT checkpoints -> difftools (Peebles & Xie, arXiv 2212.09748).

The reference ``models.DiT`` and :class:`difftools.models.dit.DiT` share their parameter names, so
the conversion is a checked copy plus four conventions (docs/interop.md has them in one table):

* **Process.** DiT trains on the DDPM linear schedule beta_k = linspace(1e-4, 0.02, 1000), k = 0..999
  (``gaussian_diffusion.get_named_beta_schedule("linear", 1000)``); here that is
  ``VP.from_betas(...)``, a :class:`~samplers.process.DiscreteVP` whose index k sits at t = (k + 1) / 1000.
* **Time.** The reference embeds the integer timestep k; the converted model embeds 1000 t - 1
  (``time_shift=-1``), i.e. exactly k at t = (k + 1) / 1000.
* **Prediction.** The first C output channels are eps; the next C (``learn_sigma``) parameterise the
  variance for the reference's DDPM sampler. They are kept by default (``return_sigma=False``: stored,
  exported back, not returned) or dropped (``drop_sigma``: the final layer shrinks to C channels).
* **Null class.** Label ``num_classes`` is the unconditional class, as in the reference (its table has
  that row when ``class_dropout_prob > 0``; a model trained without label dropout gets a zero row).

The reference's ``pos_embed`` (a fixed 2-D sin-cos table stored in its state dict) is checked against
the one the toolkit's DiT computes from its config, and not stored again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from difftools.interop.common import (
    ConversionError,
    check_layout,
    provenance,
    read_state_dict,
    write_checkpoint,
)
from difftools.models.dit import DiT, parse_preset, sincos_pos_embed_2d
from samplers.process import VP, DiscreteVP

log = logging.getLogger("difftools.interop")

SOURCE = "facebookresearch/DiT"
#: constructor defaults of the reference ``models.DiT`` (DiT-XL/2 on 256x256 ImageNet latents)
REFERENCE_DEFAULTS = dict(
    input_size=32,
    patch_size=2,
    in_channels=4,
    hidden_size=1152,
    depth=28,
    num_heads=16,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=1000,
    learn_sigma=True,
)
#: the schedule of the reference's ``create_diffusion`` (linear betas, 1000 steps)
BETA_START, BETA_END, DIFFUSION_STEPS = 1e-4, 0.02, 1000
#: max |difference| tolerated between a stored pos_embed and the recomputed sin-cos table
POS_EMBED_ATOL = 1e-5


def diffusion_process(steps: int = DIFFUSION_STEPS) -> DiscreteVP:
    """DiT's training process: betas linspace(1e-4, 0.02, 1000) in float64, as the reference builds them
    (scaled by 1000 / steps for other step counts, as ``get_named_beta_schedule`` does)."""
    scale = 1000 / steps
    return VP.from_betas(torch.linspace(scale * BETA_START, scale * BETA_END, steps, dtype=torch.float64))


def reference_config(
    config: Mapping | str | os.PathLike,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    family: str = "DiT",
) -> dict:
    """The reference constructor's arguments, from a mapping, a JSON / YAML file, or a model name.

    A name is one of the reference's ``DiT_models`` (``"DiT-XL/2"``, ``"SiT-B/4"`` with ``family="SiT"``)
    with the other arguments at their defaults; ``input_size`` (latent size = image size / 8) and
    ``num_classes`` override them. Unknown keys are refused (a typo would silently build another model).
    """
    if isinstance(config, Mapping):
        cfg = dict(config)
    elif Path(config).expanduser().is_file():
        cfg = _read_config_file(Path(config).expanduser())
    elif isinstance(config, str) and config.startswith(f"{family}-"):
        try:
            hidden, depth, heads, patch = parse_preset("DiT" + config[len(family) :])
        except ValueError as err:
            raise ConversionError(f"unknown {family} model {config!r}: {err}") from err
        cfg = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
    else:
        raise ConversionError(
            f"--config {config!r} is neither a file nor a {family} model name such as {family}-XL/2"
        )
    unknown = sorted(set(cfg) - set(REFERENCE_DEFAULTS))
    if unknown:
        raise ConversionError(
            f"config {config!r}: unknown {family} constructor arguments {unknown}; known: "
            f"{sorted(REFERENCE_DEFAULTS)}"
        )
    cfg = {**REFERENCE_DEFAULTS, **cfg}
    if input_size is not None:
        cfg["input_size"] = input_size
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    return cfg


def _read_config_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        cfg = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise ConversionError(f"cannot read config {path}: {err}") from err
    if not isinstance(cfg, dict):
        raise ConversionError(
            f"config {path} must be a mapping of constructor arguments, got {type(cfg).__name__}"
        )
    return cfg


def model_kwargs(
    ref: Mapping, *, drop_sigma: bool = False, time_scale: float = 1000.0, time_shift: float = -1.0
) -> dict:
    """Constructor arguments of the difftools DiT equivalent to the reference config ``ref``."""
    keep_sigma = bool(ref["learn_sigma"]) and not drop_sigma
    return dict(
        input_size=int(ref["input_size"]),
        in_channels=int(ref["in_channels"]),
        patch_size=int(ref["patch_size"]),
        hidden_size=int(ref["hidden_size"]),
        depth=int(ref["depth"]),
        num_heads=int(ref["num_heads"]),
        mlp_ratio=float(ref["mlp_ratio"]),
        num_classes=int(ref["num_classes"]),
        class_dropout_prob=float(ref["class_dropout_prob"]),
        learn_sigma=keep_sigma,
        return_sigma=not keep_sigma,
        time_scale=time_scale,
        time_shift=time_shift,
    )


def reference_layout(ref: Mapping) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference model's ``state_dict()`` for config ``ref``."""
    d, p, c = int(ref["hidden_size"]), int(ref["patch_size"]), int(ref["in_channels"])
    mlp = int(d * float(ref["mlp_ratio"]))
    c_out = 2 * c if ref["learn_sigma"] else c
    grid = int(ref["input_size"]) // p
    rows = int(ref["num_classes"]) + (float(ref["class_dropout_prob"]) > 0)
    layout = {
        "pos_embed": (1, grid * grid, d),
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (rows, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
    }
    for i in range(int(ref["depth"])):
        b = f"blocks.{i}."
        layout.update(
            {
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "mlp.fc1.weight": (mlp, d),
                b + "mlp.fc1.bias": (mlp,),
                b + "mlp.fc2.weight": (d, mlp),
                b + "mlp.fc2.bias": (d,),
                b + "adaLN_modulation.1.weight": (6 * d, d),
                b + "adaLN_modulation.1.bias": (6 * d,),
            }
        )
    return layout


def prediction_rows(
    weight_or_bias: torch.Tensor, patch_size: int, out_channels: int, keep: int
) -> torch.Tensor:
    """The rows of the final Linear that produce the first ``keep`` of ``out_channels`` channels.

    Each token's p*p*C_out outputs are laid out (p_row, p_col, channel), channel fastest (the reference's
    and the toolkit's unpatchify agree), so the rows of channel c are c, c + C_out, c + 2 C_out, ...
    """
    rows = weight_or_bias.reshape(patch_size * patch_size, out_channels, *weight_or_bias.shape[1:])
    return rows[:, :keep].reshape(-1, *weight_or_bias.shape[1:])


def model_from_reference(
    state: Mapping[str, torch.Tensor],
    ref: Mapping,
    *,
    source: str,
    drop_sigma: bool = False,
    time_scale: float = 1000.0,
    time_shift: float = -1.0,
    negate_prediction: bool = False,
) -> DiT:
    """The difftools DiT holding the reference-layout ``state`` (checked against ``ref``'s layout).

    ``negate_prediction`` flips the sign of the first C output channels (SiT's velocity points from
    noise to data; ours from data to noise) by negating their rows of the final Linear, which is exact.
    """
    check_layout(
        state,
        reference_layout(ref),
        source,
        hint="Check --config (num_heads, num_classes, learn_sigma, input_size) against the run that "
        "trained these weights",
    )
    kwargs = model_kwargs(ref, drop_sigma=drop_sigma, time_scale=time_scale, time_shift=time_shift)
    model = DiT(**kwargs)
    grid = model.grid_size
    pos = state["pos_embed"].double()[0]
    deviation = float((pos - sincos_pos_embed_2d(model.hidden_size, grid).double()).abs().max())
    if deviation > POS_EMBED_ATOL:
        raise ConversionError(
            f"{source}: pos_embed differs from the fixed 2-D sin-cos table of a {grid}x{grid} grid by up to "
            f"{deviation:.3g}: these weights were trained with another position embedding, which the "
            "difftools DiT (a fixed table recomputed from the config) cannot hold"
        )
    ours = {k: v for k, v in state.items() if k != "pos_embed"}
    c, p = model.in_channels, model.patch_size
    c_out = 2 * c if ref["learn_sigma"] else c
    table = ours["y_embedder.embedding_table.weight"]
    if table.shape[0] == model.num_classes:  # class_dropout_prob 0: the reference has no null row
        log.warning(
            "%s: trained without label dropout (class_dropout_prob 0), so it has no null class; the "
            "converted model gets a zero null embedding, and unconditional or guided sampling with it is "
            "not meaningful",
            source,
        )
        ours["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        w = ours[name]
        if c_out != model.out_channels:  # learned-sigma channels dropped
            w = prediction_rows(w, p, c_out, model.out_channels)
        if negate_prediction:
            w = _negate_first_channels(w, p, model.out_channels, c)
        ours[name] = w
    model.load_state_dict(ours, strict=True)
    return model.eval()


def _negate_first_channels(
    w: torch.Tensor, patch_size: int, out_channels: int, channels: int
) -> torch.Tensor:
    """``w`` (final Linear weight or bias) with the rows of the first ``channels`` output channels negated."""
    rows = w.reshape(patch_size * patch_size, out_channels, -1).clone()
    rows[:, :channels] = -rows[:, :channels]
    return rows.reshape(w.shape)


def convert(
    weights: str | os.PathLike,
    config: Mapping | str | os.PathLike,
    out: str | os.PathLike,
    *,
    drop_sigma: bool = False,
    weights_key: str | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
    autoencoder=None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Convert a facebookresearch/DiT checkpoint into a difftools checkpoint directory ``out``.

    ``weights``: the released ``DiT-XL-2-256x256.pt`` (a state dict), a training checkpoint of its
    train.py (``weights_key`` picks ``"ema"`` (default) or ``"model"``), or a safetensors file.
    ``config``: see :func:`reference_config`. ``autoencoder``: the latent autoencoder to record (e.g.
    ``build_autoencoder("kl", path=<sd-vae-ft-ema>, scale=0.18215)``); None records none.
    """
    ref = reference_config(config, input_size=input_size, num_classes=num_classes)
    state = read_state_dict(weights, weights_key)
    model = model_from_reference(state, ref, source=f"{weights} ({SOURCE} layout)", drop_sigma=drop_sigma)
    sigma = "none" if not ref["learn_sigma"] else ("dropped" if drop_sigma else "kept (not returned)")
    interop = provenance(
        SOURCE,
        weights,
        reference_config=ref,
        learned_sigma=sigma,
        time="t = (k + 1) / 1000 for reference timestep k",
        prediction="eps",
    )
    return write_checkpoint(
        out,
        model,
        process=diffusion_process(),
        prediction="eps",
        interop=interop,
        autoencoder=autoencoder,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )
