"""Train a small autoencoder for latent diffusion (Hydra entry point, config conf/vae.yaml).

    python train/vae.py data.name=cifar10 train.steps=20000
    python train/vae.py data.name=mnist data.image_size=32 model.type=tiny

KL type: diffusers ``AutoencoderKL`` (default 4x downsampling, 4 latent channels) trained with

    L = mean |x - D(z)|  (or squared)  +  kl_weight * KL(q(z|x) || N(0, I)) / (C H W),   z ~ q(z|x)

(the LDM recipe without the perceptual/GAN terms, arXiv 2112.10752). Tiny type: ``AutoencoderTiny``
with the reconstruction term only. After training, ``scaling_factor = 1/std`` and ``shift_factor =
mean`` of the encoded training latents are written into the model config, and the model is saved
with ``save_pretrained`` (safetensors) to ``out``; ``metrics.json`` there records the held-out
reconstruction PSNR. Load it with ``build_autoencoder("kl", path=out)``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from difftools.device import default_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftools.models.autoencoders import psnr  # noqa: E402

log = logging.getLogger("train.vae")


def build_model(mcfg, channels: int):
    """Fresh diffusers autoencoder from the ``model`` config node."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    ch = [int(c) for c in mcfg.block_out_channels]
    if mcfg.type == "kl":
        n = len(ch)
        return AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(ch),
            layers_per_block=int(mcfg.layers_per_block),
            latent_channels=int(mcfg.latent_channels),
            norm_num_groups=int(mcfg.norm_num_groups),
            mid_block_add_attention=bool(mcfg.mid_block_add_attention),
        )
    if mcfg.type == "tiny":
        # TAESD layout: one constant width through all stages (diffusers' blocks do not change width).
        n, width = len(ch), ch[-1]
        blocks = tuple(int(mcfg.layers_per_block) for _ in range(n))
        return AutoencoderTiny(
            in_channels=channels,
            out_channels=channels,
            encoder_block_out_channels=(width,) * n,
            decoder_block_out_channels=(width,) * n,
            num_encoder_blocks=blocks,
            num_decoder_blocks=blocks,
            latent_channels=int(mcfg.latent_channels),
        )
    raise ValueError(f"model.type must be 'kl' or 'tiny', got {mcfg.type!r}")


def _encode_mean(model, x):
    out = model.encode(x)
    return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents


def _reconstruct(model, x, sample: bool, generator=None):
    """(x_hat, kl per sample or None)."""
    out = model.encode(x)
    if hasattr(out, "latent_dist"):
        dist = out.latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return model.decode(z).sample, dist.kl()
    return model.decode(out.latents).sample, None


def _batches(dataset, n: int, batch_size: int):
    n = min(n, len(dataset))
    for i in range(0, n, batch_size):
        items = [dataset[j] for j in range(i, min(n, i + batch_size))]
        yield torch.stack([a for a, _ in items])


@torch.no_grad()
def evaluate_psnr(model, dataset, n: int, device, batch_size: int = 128) -> float:
    """Mean per-image PSNR (dB, images in [-1, 1], outputs clamped) of mean-latent reconstructions."""
    model.eval()
    total, count = 0.0, 0
    for x in _batches(dataset, n, batch_size):
        x = x.to(device)
        x_hat, _ = _reconstruct(model, x, sample=False)
        total += float(psnr(x_hat.clamp(-1, 1), x)) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def estimate_factors(model, dataset, n: int, device, batch_size: int = 128) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1/std, mean) of the posterior means of n training images."""
    zs = [_encode_mean(model, x.to(device)).float().cpu() for x in _batches(dataset, n, batch_size)]
    z = torch.cat(zs)
    mean = float(z.mean())
    return 1.0 / float((z - mean).std()), mean


def run(cfg: DictConfig) -> dict:
    """Train, evaluate, estimate the latent scale and save; returns the metrics dict."""
    from difftools.data import build_dataset

    t0 = time.time()
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(int(tc.num_threads))
    # Tiny weights/gradients become denormal floats late in CPU training and slow every op ~10x.
    torch.set_flush_denormal(True)
    device = default_device(tc.device)
    torch.manual_seed(int(tc.seed))
    train_set = build_dataset(
        cfg.data.name,
        root=cfg.data.root,
        split="train",
        image_size=cfg.data.image_size,
        random_flip=bool(cfg.data.random_flip),
    )
    try:
        eval_set = build_dataset(
            cfg.data.name, root=cfg.data.root, split=cfg.data.eval_split, image_size=cfg.data.image_size
        )
    except (FileNotFoundError, ValueError) as e:
        log.warning("no %s split (%s); reporting PSNR on training images", cfg.data.eval_split, e)
        eval_set = build_dataset(
            cfg.data.name, root=cfg.data.root, split="train", image_size=cfg.data.image_size
        )
    info = train_set.info
    down = 2 ** (len(cfg.model.block_out_channels) - 1)
    if info.image_size % down:
        raise ValueError(f"image size {info.image_size} is not divisible by the downsampling {down}")
    model = build_model(cfg.model, info.channels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc.lr), weight_decay=float(tc.weight_decay))
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=int(tc.batch_size),
        shuffle=True,
        drop_last=True,
        num_workers=int(tc.num_workers),
        persistent_workers=int(tc.num_workers) > 0,
        generator=torch.Generator().manual_seed(int(tc.seed)),
    )
    use_bf16 = bool(tc.bf16) and device.type == "cuda"
    n_pix = info.channels * info.image_size**2
    step, it = 0, iter(loader)
    model.train()
    while step < int(tc.steps):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            x_hat, kl = _reconstruct(model, x, sample=True)
        x_hat = x_hat.float()
        rec = (x_hat - x).abs().mean() if tc.recon == "l1" else (x_hat - x).pow(2).mean()
        loss = rec
        kl_term = torch.zeros((), device=device)
        if kl is not None:
            kl_term = kl.float().mean() / n_pix
            loss = rec + float(tc.kl_weight) * kl_term
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: rec={rec.item()} kl={kl_term.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
        opt.step()
        step += 1
        if step % int(tc.log_every) == 0 or step == int(tc.steps):
            train_psnr = 10 * math.log10(4.0 / max(F.mse_loss(x_hat.clamp(-1, 1), x).item(), 1e-12))
            log.info(
                "step %d loss %.4f rec %.4f kl %.2f batch-psnr %.2f dB",
                step,
                loss.item(),
                rec.item(),
                kl_term.item(),
                train_psnr,
            )
    model.eval()
    eval_psnr = evaluate_psnr(model, eval_set, int(tc.eval_images), device)
    scale, shift = estimate_factors(model, train_set, int(tc.scale_images), device)
    # Both diffusers classes read these two config fields; build_autoencoder picks them up.
    model.register_to_config(scaling_factor=scale, shift_factor=shift)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(str(out), safe_serialization=True)
    metrics = {
        "psnr_db": eval_psnr,
        "eval_split": cfg.data.eval_split,
        "eval_images": min(int(tc.eval_images), len(eval_set)),
        "steps": step,
        "scaling_factor": scale,
        "shift_factor": shift,
        "downsample": down,
        "latent_channels": int(cfg.model.latent_channels),
        "dataset": info.name,
        "image_size": info.image_size,
        "seconds": time.time() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(
        "saved %s: PSNR %.2f dB on %d %s images, scaling_factor %.4f shift %.4f",
        out,
        eval_psnr,
        metrics["eval_images"],
        cfg.data.eval_split,
        scale,
        shift,
    )
    return metrics


@hydra.main(version_base=None, config_path="../conf", config_name="vae")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
