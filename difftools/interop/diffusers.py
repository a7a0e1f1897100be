"""difftools DiT <-> diffusers ``DiTTransformer2DModel`` (+ its scheduler config).

The two networks compute the same function once four things are lined up (docs/interop.md):

* **Layout.** diffusers splits the fused qkv projection into ``to_q/to_k/to_v`` and gives every block
  its own copy of the timestep / label embedder (``norm1.emb``; the output layer uses block 0's).
  Export copies the one embedder into every block; import requires the copies to be equal.
* **Time.** A diffusers network is called with the scheduler's timestep: ``N t - 1`` for DDPM-family
  schedulers (index k at t = (k + 1) / N, :class:`~samplers.process.DiscreteVP`) and ``N t`` for
  ``FlowMatchEulerDiscreteScheduler`` (:class:`~samplers.process.Flow`); the imported DiT embeds the
  same value (``time_scale``, ``time_shift``).
* **Frequencies.** diffusers' ``CombinedTimestepLabelEmbeddings`` hard-codes
  ``Timesteps(downscale_freq_shift=1)``: f_k = 10000^(-k / 127), where facebookresearch/DiT and the
  toolkit's default use 10000^(-k / 128). The imported DiT sets ``time_freq_shift=1``; a DiT with
  ``time_freq_shift=0`` has no exact diffusers equivalent and is exported only on request
  (``approximate_time_embedding``), which is what diffusers' own port of DiT-XL/2 did.
* **Norm eps.** The layer norm before each MLP uses diffusers' ``norm_eps`` (default 1e-5; all other
  norms 1e-6): the DiT's ``mlp_norm_eps``.

What cannot be mapped is refused with the reason: unconditional DiTs (``DiTTransformer2DModel``
always embeds a class label), ``mlp_ratio`` other than 4, and on import any other ``norm_type``,
activation or affine norms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from difftools.checkpoint import INDEX_SUFFIX, atomic_directory, read_json
from difftools.checkpoint import load as load_checkpoint
from difftools.interop.common import (
    ConversionError,
    check_layout,
    prepare_out,
    provenance,
    read_state_dict,
    write_checkpoint,
)
from difftools.interop.dit import prediction_rows
from difftools.models.dit import DiT
from difftools.models.vae import build_autoencoder
from samplers.adapters import scheduler_process
from samplers.process import DiscreteVP, Flow

log = logging.getLogger("difftools.interop")

TRANSFORMER_DIR, SCHEDULER_DIR, VAE_DIR = "transformer", "scheduler", "vae"
MODEL_CONFIG, SCHEDULER_CONFIG = "config.json", "scheduler_config.json"
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors" + INDEX_SUFFIX,
    "diffusion_pytorch_model.bin",
)
CLASS_NAME = "DiTTransformer2DModel"
#: diffusers' DiT: fixed parts of its config (anything else has no difftools equivalent)
FIXED_CONFIG = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "norm_elementwise_affine": False,
}
#: our prediction type -> diffusers' prediction_type for DDPM-family schedulers
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
FREQ_SHIFT = 1  # Timesteps(downscale_freq_shift=1) in CombinedTimestepLabelEmbeddings


# ------------------------------------------------------------------------------------------- layout
def _embedder_keys(i: int) -> dict[str, str]:
    e = f"transformer_blocks.{i}.norm1.emb."
    return {
        "t_embedder.mlp.0.weight": e + "timestep_embedder.linear_1.weight",
        "t_embedder.mlp.0.bias": e + "timestep_embedder.linear_1.bias",
        "t_embedder.mlp.2.weight": e + "timestep_embedder.linear_2.weight",
        "t_embedder.mlp.2.bias": e + "timestep_embedder.linear_2.bias",
        "y_embedder.embedding_table.weight": e + "class_embedder.embedding_table.weight",
    }


def _block_keys(i: int) -> dict[str, str]:
    """Our block-i keys -> diffusers' (qkv aside: it is split in three)."""
    b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    return {
        b + "adaLN_modulation.1.weight": d + "norm1.linear.weight",
        b + "adaLN_modulation.1.bias": d + "norm1.linear.bias",
        b + "attn.proj.weight": d + "attn1.to_out.0.weight",
        b + "attn.proj.bias": d + "attn1.to_out.0.bias",
        b + "mlp.fc1.weight": d + "ff.net.0.proj.weight",
        b + "mlp.fc1.bias": d + "ff.net.0.proj.bias",
        b + "mlp.fc2.weight": d + "ff.net.2.weight",
        b + "mlp.fc2.bias": d + "ff.net.2.bias",
    }


OUTER_KEYS = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}


def to_diffusers_state(model: DiT) -> dict[str, torch.Tensor]:
    """The DiT's weights under ``DiTTransformer2DModel``'s names (the embedder copied into every block)."""
    ours = model.state_dict()
    out = {theirs: ours[k] for k, theirs in OUTER_KEYS.items()}
    for i in range(model.depth):
        out.update({theirs: ours[k] for k, theirs in _embedder_keys(i).items()})
        out.update({theirs: ours[k] for k, theirs in _block_keys(i).items()})
        q, k, v = ours[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)
        qb, kb, vb = ours[f"blocks.{i}.attn.qkv.bias"].chunk(3, dim=0)
        a = f"transformer_blocks.{i}.attn1."
        out.update(
            {
                a + "to_q.weight": q,
                a + "to_k.weight": k,
                a + "to_v.weight": v,
                a + "to_q.bias": qb,
                a + "to_k.bias": kb,
                a + "to_v.bias": vb,
            }
        )
    return {k: v.detach().clone() for k, v in out.items()}


def diffusers_layout(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a ``DiTTransformer2DModel`` state dict for its config ``cfg``."""
    d = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    c, p = int(cfg["in_channels"]), int(cfg["patch_size"])
    c_out = int(cfg.get("out_channels") or c)
    bias = bool(cfg.get("attention_bias", True))
    layout = {
        "pos_embed.proj.weight": (d, c, p, p),
        "pos_embed.proj.bias": (d,),
        "proj_out_1.weight": (2 * d, d),
        "proj_out_1.bias": (2 * d,),
        "proj_out_2.weight": (p * p * c_out, d),
        "proj_out_2.bias": (p * p * c_out,),
    }
    for i in range(int(cfg["num_layers"])):
        t = f"transformer_blocks.{i}."
        e = t + "norm1.emb."
        layout.update(
            {
                e + "timestep_embedder.linear_1.weight": (d, 256),
                e + "timestep_embedder.linear_1.bias": (d,),
                e + "timestep_embedder.linear_2.weight": (d, d),
                e + "timestep_embedder.linear_2.bias": (d,),
                e + "class_embedder.embedding_table.weight": (int(cfg["num_embeds_ada_norm"]) + 1, d),
                t + "norm1.linear.weight": (6 * d, d),
                t + "norm1.linear.bias": (6 * d,),
                t + "attn1.to_out.0.weight": (d, d),
                t + "attn1.to_out.0.bias": (d,),
                t + "ff.net.0.proj.weight": (4 * d, d),
                t + "ff.net.0.proj.bias": (4 * d,),
                t + "ff.net.2.weight": (d, 4 * d),
                t + "ff.net.2.bias": (d,),
            }
        )
        for n in ("to_q", "to_k", "to_v"):
            layout[f"{t}attn1.{n}.weight"] = (d, d)
            if bias:
                layout[f"{t}attn1.{n}.bias"] = (d,)
    return layout


def from_diffusers_state(
    state: Mapping[str, torch.Tensor], cfg: Mapping, source: str
) -> dict[str, torch.Tensor]:
    """A ``DiTTransformer2DModel`` state dict -> the DiT's names; the per-block embedder copies must agree."""
    check_layout(state, diffusers_layout(cfg), source)
    depth = int(cfg["num_layers"])
    first = _embedder_keys(0)
    for i in range(1, depth):
        for ours, theirs in _embedder_keys(i).items():
            if not torch.equal(state[theirs], state[first[ours]]):
                diff = float((state[theirs].double() - state[first[ours]].double()).abs().max())
                raise ConversionError(
                    f"{source}: {theirs} differs from block 0's copy (max |diff| {diff:.3g}). diffusers "
                    "keeps one timestep/label embedder per block, the difftools DiT one for all; the blocks "
                    "of this model embed time or class differently, which the DiT cannot hold"
                )
    out = {ours: state[theirs] for ours, theirs in OUTER_KEYS.items()}
    out.update({ours: state[theirs] for ours, theirs in first.items()})
    for i in range(depth):
        out.update({ours: state[theirs] for ours, theirs in _block_keys(i).items()})
        a = f"transformer_blocks.{i}.attn1."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [state[a + n + ".weight"] for n in ("to_q", "to_k", "to_v")]
        )
        biases = [state.get(a + n + ".bias") for n in ("to_q", "to_k", "to_v")]
        d = state[a + "to_q.weight"].shape[0]
        # attention_bias=False: no biases, i.e. zero ones
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(d) for b in biases])
    return out


# ------------------------------------------------------------------------------------------- export
def diffusers_config(model: DiT, *, approximate_time_embedding: bool = False) -> dict:
    """``DiTTransformer2DModel`` constructor arguments for ``model``; refuses what diffusers cannot hold."""
    problems = []
    if model.num_classes == 0:
        problems.append(
            "the DiT is unconditional (num_classes=0), but DiTTransformer2DModel always embeds a class "
            "label (num_embeds_ada_norm)"
        )
    if model.mlp_ratio != 4.0:
        problems.append(
            f"mlp_ratio is {model.mlp_ratio}, but diffusers' BasicTransformerBlock feed-forward is "
            "4 x hidden_size (DiTTransformer2DModel does not expose ff_inner_dim)"
        )
    freq_shift = model.config()["time_freq_shift"]
    if freq_shift != FREQ_SHIFT and not approximate_time_embedding:
        half = model.t_embedder.frequency_size // 2
        problems.append(
            f"the DiT's time embedding uses frequencies 10000^(-k/{half - freq_shift}) "
            f"(time_freq_shift={freq_shift}, as facebookresearch/DiT), but diffusers' "
            "CombinedTimestepLabelEmbeddings hard-codes Timesteps(downscale_freq_shift=1), i.e. "
            f"10000^(-k/{half - 1}): the same weights give different outputs. Pass "
            "--approximate-time-embedding (approximate_time_embedding=True) to export anyway, as diffusers' "
            "own port of DiT-XL/2 did"
        )
    if problems:
        raise ConversionError(
            "cannot export this DiT as a diffusers DiTTransformer2DModel: " + "; ".join(problems)
        )
    return dict(
        num_attention_heads=model.num_heads,
        attention_head_dim=model.hidden_size // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=model.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=model.input_size,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=model.num_classes,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=float(model.config()["mlp_norm_eps"]),
    )


def scheduler_config(model: DiT, process, prediction: str) -> tuple[str, dict]:
    """(diffusers scheduler class name, its config) that calls the exported network with the timesteps the
    DiT was trained to see; :class:`ConversionError` when no diffusers scheduler does."""
    scale, shift = float(model.t_embedder.time_scale), float(model.t_embedder.time_shift)
    if isinstance(process, DiscreteVP) and (scale, shift) == (process.num_train_timesteps, -1.0):
        if prediction not in PREDICTION_TYPES:
            raise ConversionError(
                f"prediction {prediction!r} on a discrete VP process has no diffusers "
                f"prediction_type (known: {sorted(PREDICTION_TYPES)})"
            )
        return "DDPMScheduler", dict(
            num_train_timesteps=process.num_train_timesteps,
            prediction_type=PREDICTION_TYPES[prediction],
            clip_sample=False,
            variance_type="learned_range" if model.learn_sigma else "fixed_small",
            **_betas_config(process),
        )
    if isinstance(process, Flow) and shift == 0.0 and scale > 0 and scale == int(scale):
        if prediction != "flow":
            raise ConversionError(
                f"FlowMatchEulerDiscreteScheduler expects a velocity (prediction 'flow'), the "
                f"checkpoint predicts {prediction!r}"
            )
        return "FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=int(scale), shift=1.0)
    raise ConversionError(
        f"no diffusers scheduler calls this network the way it was trained: the checkpoint's process is "
        f"{process!r} and the DiT embeds s = {scale:g} t + {shift:g}; DDPM-family schedulers need a "
        "DiscreteVP with s = N t - 1, FlowMatchEulerDiscreteScheduler a Flow with s = N t. Pass "
        "--transformer-only "
        f"(transformer_only=True) to export the network alone, and call it with timestep = "
        f"{scale:g} t + {shift:g}"
    )


def _betas_config(process: DiscreteVP) -> dict:
    """``beta_schedule="linear"`` with its end points when the betas are linear, else ``trained_betas``."""
    ac = process.alphas_cumprod
    betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]])
    linear = torch.linspace(float(betas[0]), float(betas[-1]), betas.numel(), dtype=torch.float64)
    if float((betas - linear).abs().max()) < 1e-12:
        return dict(
            beta_schedule="linear",
            beta_start=float(f"{float(betas[0]):.12g}"),
            beta_end=float(f"{float(betas[-1]):.12g}"),
        )
    return dict(trained_betas=betas.tolist())


def export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    use_ema: bool = True,
    approximate_time_embedding: bool = False,
    transformer_only: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Write a difftools DiT checkpoint as ``out/transformer`` (``DiTTransformer2DModel.from_pretrained``)
    and, unless ``transformer_only``, ``out/scheduler`` (the matching scheduler's config)."""
    from diffusers import DiTTransformer2DModel
    from diffusers import schedulers as diffusers_schedulers

    loaded = load_checkpoint(ckpt, use_ema=use_ema)
    model = loaded.model
    if not isinstance(model, DiT):
        raise ConversionError(
            f"{loaded.path} holds a {type(model).__name__}; only a DiT maps to diffusers' {CLASS_NAME}"
        )
    cfg = diffusers_config(model, approximate_time_embedding=approximate_time_embedding)
    scheduler = None if transformer_only else scheduler_config(model, loaded.process, loaded.prediction)
    out = prepare_out(out, overwrite, marker=f"{TRANSFORMER_DIR}/{MODEL_CONFIG}", what="diffusers export")
    net = DiTTransformer2DModel(**cfg)
    net.load_state_dict(to_diffusers_state(model), strict=True)
    with atomic_directory(out) as tmp:
        net.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True, max_shard_size=max_shard_size)
        if scheduler is not None:
            name, kwargs = scheduler
            getattr(diffusers_schedulers, name)(**kwargs).save_pretrained(tmp / SCHEDULER_DIR)
    log.info("wrote %s (%s%s)", out, CLASS_NAME, "" if scheduler is None else f" + {scheduler[0]}")
    return out


# ------------------------------------------------------------------------------------------- import
def _find(folder: Path, scheduler: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(transformer folder, scheduler config file or None) of a pipeline folder or a transformer folder."""
    transformer = folder / TRANSFORMER_DIR if (folder / TRANSFORMER_DIR / MODEL_CONFIG).is_file() else folder
    if not (transformer / MODEL_CONFIG).is_file():
        raise ConversionError(
            f"{folder} is not a diffusers model folder: expected {folder / MODEL_CONFIG} or "
            f"{folder / TRANSFORMER_DIR / MODEL_CONFIG}"
        )
    if scheduler is not None:
        s = Path(scheduler).expanduser()
        s = s / SCHEDULER_CONFIG if s.is_dir() else s
        if not s.is_file():
            raise ConversionError(f"scheduler config not found: {s}")
        return transformer, s
    for s in (
        folder / SCHEDULER_DIR / SCHEDULER_CONFIG,
        transformer.parent / SCHEDULER_DIR / SCHEDULER_CONFIG,
    ):
        if s.is_file():
            return transformer, s
    return transformer, None


def dit_kwargs(
    cfg: Mapping, *, timestep_scale: float, timestep_shift: float, drop_sigma: bool = False, source: str = ""
) -> dict:
    """difftools DiT constructor arguments equivalent to a ``DiTTransformer2DModel`` config."""
    problems = [
        f"{k} is {cfg.get(k)!r} (only {v!r} maps to the DiT)"
        for k, v in FIXED_CONFIG.items()
        if k in cfg and cfg[k] != v
    ]
    c = int(cfg.get("in_channels", 4))
    c_out = int(cfg.get("out_channels") or c)
    if c_out not in (c, 2 * c):
        problems.append(
            f"out_channels is {c_out}; the DiT predicts in_channels ({c}) or twice that (learned sigma)"
        )
    if cfg.get("num_embeds_ada_norm") is None:
        problems.append("num_embeds_ada_norm is None (no class embedding)")
    if problems:
        raise ConversionError(
            f"{source}: cannot map this {CLASS_NAME} to the difftools DiT: " + "; ".join(problems)
        )
    learn_sigma = c_out == 2 * c and not drop_sigma
    return dict(
        input_size=int(cfg["sample_size"]),
        in_channels=c,
        patch_size=int(cfg["patch_size"]),
        hidden_size=int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
        depth=int(cfg["num_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=4.0,
        num_classes=int(cfg["num_embeds_ada_norm"]),
        class_dropout_prob=0.1,
        learn_sigma=learn_sigma,
        return_sigma=not learn_sigma,
        time_scale=float(timestep_scale),
        time_shift=float(timestep_shift),
        time_freq_shift=FREQ_SHIFT,
        mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)),
    )


def convert(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scheduler: str | os.PathLike | None = None,
    drop_sigma: bool = False,
    autoencoder=None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Import a diffusers ``DiTTransformer2DModel`` (a pipeline folder with ``transformer/`` and
    ``scheduler/``, or a transformer folder plus ``scheduler``) as a difftools checkpoint ``out``.

    The scheduler config gives the process, the prediction type and the timestep convention. A
    pipeline's ``vae/`` (AutoencoderKL) is recorded as the autoencoder unless ``autoencoder`` is given.
    """
    folder = Path(folder).expanduser()
    transformer, sched_file = _find(folder, scheduler)
    if sched_file is None:
        raise ConversionError(
            f"no scheduler config next to {transformer} (looked for {SCHEDULER_DIR}/"
            f"{SCHEDULER_CONFIG}); pass --scheduler PATH so that the process, the prediction type "
            "and the timestep convention are known"
        )
    cfg = read_json(transformer / MODEL_CONFIG)
    if cfg.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ConversionError(
            f"{transformer / MODEL_CONFIG}: _class_name is {cfg['_class_name']!r}; only "
            f"{CLASS_NAME} maps to the difftools DiT"
        )
    weights = next((transformer / n for n in WEIGHT_NAMES if (transformer / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"no weights in {transformer}: expected one of {list(WEIGHT_NAMES)}")
    try:
        process, prediction, t_scale, t_shift = scheduler_process(read_json(sched_file))
    except (ValueError, TypeError, KeyError) as err:
        raise ConversionError(f"{sched_file}: {err}") from err
    source = f"{weights} ({CLASS_NAME})"
    model = DiT(
        **dit_kwargs(
            cfg, timestep_scale=t_scale, timestep_shift=t_shift, drop_sigma=drop_sigma, source=source
        )
    )
    state = from_diffusers_state(read_state_dict(weights), cfg, source)
    c_out = int(cfg.get("out_channels") or cfg.get("in_channels", 4))
    if c_out != model.out_channels:  # learned-sigma channels dropped
        for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
            state[name] = prediction_rows(state[name], model.patch_size, c_out, model.out_channels)
    model.load_state_dict(state, strict=True)
    if autoencoder is None and (folder / VAE_DIR / MODEL_CONFIG).is_file():
        autoencoder = build_autoencoder("kl", path=str(folder / VAE_DIR))
    interop = provenance(
        f"diffusers {CLASS_NAME}",
        weights,
        diffusers_config=cfg,
        scheduler=str(sched_file),
        scheduler_config=read_json(sched_file),
        learned_sigma="none"
        if c_out == model.in_channels
        else ("dropped" if drop_sigma else "kept (not returned)"),
    )
    return write_checkpoint(
        out,
        model.eval(),
        process=process,
        prediction=prediction,
        interop=interop,
        autoencoder=autoencoder,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )
