"""GPU acceptance for SRA² VAE-feature alignment (arXiv 2601.17830): vanilla vs aligned latent DiT.

Trains the same latent DiT twice — same seed, same initial weights, same data order, same t and
noise draws, same step budget — once with the plain flow-matching loss and once with
``loss.align`` (Smooth-L1 between a 5-layer projection of the tokens after block ``depth`` and the
clean TAEF2 latent). Both runs are evaluated (EMA weights) at several fractions of the budget:

* ``fd_<classifier>``: Fréchet distance in the feature space of H5's metric classifier
  (difftools.metrics; Inception weights are not available offline, so this is not FID), between
  ``--eval-samples`` generated images and ``--ref-samples`` training images, with the sampler and
  step count recorded;
* the held-out denoising loss on a fixed batch of cached test latents with fixed t and noise.

Reported: the curves (table + plot), the convergence speed-up = budget / (steps the aligned run
needs to reach the vanilla run's final value, linear interpolation between evaluations), and the
step-time overhead of the alignment branch (median step time, aligned / vanilla) next to its
analytic FLOPs overhead.

    python scripts/align_experiment.py --out runs/align            # H100, ~8 minutes in total
    python scripts/align_experiment.py --smoke --out /tmp/align    # CPU, < 1 minute

Default GPU setup: CIFAR-10 upsampled to 64x64 -> TAEF2 latents 8x8x32 (cached once with flips),
DiT-S with patch size 1 (64 tokens, hidden 384, 12 blocks), alignment after block 2, batch 256,
AdamW lr 2e-4, flow matching with logit-normal t, dpmpp_2m 20 steps without guidance for samples.
The step budget is chosen by timing a few steps first so that the whole run fits ``--budget-s``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from difftools.data import build_dataset
from difftools.data.latents import AutoencoderMismatchError, LatentDataset, cache_latents
from difftools.device import default_device
from difftools.generate import SampleSpec, generate_uint8
from difftools.loaded import Loaded
from difftools.losses import DenoisingLoss, build_loss
from difftools.losses.alignment import AlignedLoss, alignment_flops_overhead
from difftools.metrics.classifier import default_classifier
from difftools.metrics.distances import fd
from difftools.metrics.features import ClassifierFeatures
from difftools.metrics.reference import reference_stats
from difftools.metrics.stats import compute_stats
from difftools.models.autoencoders import build_autoencoder
from difftools.models.dit import DiT
from difftools.process import make_process
from difftools.training.ema import EMA
from difftools.training.grid import save_grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (digits, pixel space) in < 1 minute")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this before encoding")
    p.add_argument("--vae", default="taef2")
    p.add_argument("--vae-path", default=None)
    p.add_argument("--limit", type=int, default=None, help="cache only the first N training images")
    p.add_argument("--cache", default=None, help="latent cache dir (default <out>/latents); reused if valid")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--align-depth", type=int, default=2)
    p.add_argument("--align-weight", type=float, default=1.0)
    p.add_argument("--align-features", default="latent")
    p.add_argument("--steps", type=int, default=20000, help="upper bound; lowered to fit --budget-s")
    p.add_argument(
        "--budget-s",
        type=float,
        default=300.0,
        help="wall-clock budget for calibration + both runs + evaluations, counted after setup "
        "(latent cache, metric classifier, reference statistics: ~1-2 min on a fresh GPU box)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--ref-samples", type=int, default=10000)
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument(
        "--classifier", default=None, help="metric classifier checkpoint (default: cached/trained)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        # pixel-space digits (identity autoencoder): exercises every code path on 2 CPU cores
        args.data, args.image_size, args.vae = "digits", 16, "identity"
        args.hidden, args.depth, args.heads, args.patch = 64, 4, 2, 2
        args.steps, args.batch_size, args.lr, args.warmup, args.ema = 40, 32, 1e-3, 5, 0.9
        args.eval_fractions, args.eval_samples, args.ref_samples = [0.5, 1.0], 100, 360
        args.solver, args.sample_steps, args.budget_s = "ddim", 5, 30.0
        args.device = "cpu" if args.device == "auto" else args.device
        # one thread: on a shared 2-core box two threads per process oversubscribe and run ~10x slower
        args.threads = args.threads or 1
    return args


# ------------------------------------------------------------------------------------ setup
def prepare_latents(args, device, log):
    """Cache (or reuse) train/test latents; returns (train LatentDataset, test LatentDataset, ae)."""
    kw = {"path": args.vae_path} if args.vae_path else {}
    ae = build_autoencoder(args.vae, **kw)
    if args.vae == "identity":
        ae.latent_channels = ae.in_channels = None
    cache = Path(args.cache) if args.cache else Path(args.out) / "latents"
    sets = {}
    for split in ("train", "test"):
        d = cache / split
        try:
            sets[split] = LatentDataset(d, autoencoder=ae, random_flip=(split == "train"))
            log(f"reusing latent cache {d} ({len(sets[split])} items)")
            continue
        except (FileNotFoundError, AutoencoderMismatchError, ValueError) as e:
            log(f"building latent cache {d}: {type(e).__name__}")
        ds = build_dataset(args.data, root=args.root, split=split, image_size=args.image_size)
        limit = 512 if args.smoke else args.limit
        t0 = time.time()
        cache_latents(
            ds,
            ae,
            d,
            flip=(split == "train"),
            batch_size=500,
            device=device,
            limit=limit if split == "train" else min(limit or 10**9, 2000),
            scale_images=2048,
        )
        log(f"  encoded {split} in {time.time() - t0:.1f}s")
        sets[split] = LatentDataset(d, autoencoder=ae, random_flip=(split == "train"))
    return sets["train"], sets["test"], ae.to(device)


def build_model(args, info, seed):
    torch.manual_seed(seed)
    return DiT(
        input_size=info.image_size,
        in_channels=info.channels,
        patch_size=args.patch,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=info.num_classes,
        class_dropout_prob=0.1,
    )


def loss_config(args, aligned: bool) -> dict:
    return {
        "prediction": "flow",
        "t_distribution": "logit_normal",
        "align": {
            "weight": args.align_weight if aligned else 0.0,
            "depth": args.align_depth,
            "features": args.align_features,
            "beta": 0.05,
            "widths": None,
        },
    }


class Run:
    """One training run: model, loss (with or without alignment), AdamW, EMA, fixed RNG streams."""

    def __init__(self, args, info, process, ae, aligned, device, seed):
        self.aligned = aligned
        self.model = build_model(args, info, seed).to(device)
        torch.manual_seed(seed + 1)  # projector init (aligned only) does not shift the runs' RNG below
        self.loss_fn = build_loss(loss_config(args, aligned), self.model, process, ae).to(device)
        params = list(self.model.parameters()) + list(self.loss_fn.parameters())
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / args.warmup))
        self.ema = EMA(self.model, decay=args.ema)
        self.data_gen = torch.Generator().manual_seed(seed + 2)
        self.noise_gen = torch.Generator(device=device).manual_seed(seed + 3)
        torch.manual_seed(seed + 4)  # label dropout draws from the global RNG: same in both runs
        self.device, self.step, self.times = device, 0, []

    def train_step(self, latents, labels, batch_size, bf16):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=self.data_gen)
        view = torch.randint(0, latents.shape[1], (batch_size,), generator=self.data_gen)
        x0 = latents[idx.to(latents.device), view.to(latents.device)].float()
        y = labels[idx.to(labels.device)]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, logs = self.loss_fn(self.model, x0, y, generator=self.noise_gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)
        self.step += 1
        return logs

    def ema_model(self):
        m = copy.deepcopy(self.model)
        self.ema.copy_to(m)
        return m.eval()


@torch.no_grad()
def val_loss(model, process, x0, y, seed) -> float:
    """Held-out flow-matching MSE on fixed latents, t (logit-normal) and noise."""
    g = torch.Generator(device=x0.device).manual_seed(seed)
    loss, _ = DenoisingLoss(process, prediction="flow", t_distribution="logit_normal")(
        model, x0, y, generator=g
    )
    return float(loss)


def generate(model, process, ae, n, args, seed):
    """n decoded samples as uint8 [n, C, H, W] (per-image seeds from ``seed``, labels cycling 0..K-1,
    no guidance; ``difftools.generate``)."""
    device = next(model.parameters()).device
    spec = SampleSpec(sampler=args.solver, steps=args.sample_steps, seed=seed, precision="fp32")
    images, _, _ = generate_uint8(Loaded(model, process, "flow", ae), range(n), spec,
                                  1000 if device.type == "cuda" else 100, device)
    return images


def crossing_step(steps, values, target):
    """First step at which the curve reaches ``target`` (<=), linearly interpolated; None if never."""
    prev_s, prev_v = 0, None
    for s, v in zip(steps, values, strict=True):
        if v <= target:
            if prev_v is None or prev_v == v:
                return float(s)
            return prev_s + (s - prev_s) * (prev_v - target) / (prev_v - v)
        prev_s, prev_v = s, v
    return None


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "w")

    def log(msg):
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = default_device(args.device)
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_set, test_set, ae = prepare_latents(args, device, log)
    info, src = train_set.info, train_set.source_info
    latents = train_set.latents.to(device)
    labels = train_set.labels.to(device)
    n_val = min(512, len(test_set))
    val_x = test_set.latents[:n_val, 0].float().to(device)
    val_y = test_set.labels[:n_val].to(device)
    process = make_process("flow")
    ae_eval = ae if args.vae != "identity" else None

    # metric classifier at the source resolution (CIFAR-10: 32px); samples are resized to it
    ref_size = 32 if src.get("name") == "cifar10" else src.get("image_size")
    if args.classifier:
        extractor = ClassifierFeatures.from_checkpoint(args.classifier, device=device)
    else:
        extractor = default_classifier(
            src["name"], image_size=ref_size, root=args.root, device=device, log=log
        )
    ref = reference_stats(
        src["name"], extractor, split="train", image_size=ref_size, root=args.root, max_items=args.ref_samples
    )
    log(f"metric: fd_{extractor.name} vs {ref.n} train images; setup done")
    t_setup = time.time()

    # calibration: time the aligned step (the slower one) and one evaluation, then fix the budget
    probe = Run(args, info, process, ae, True, device, args.seed)
    for _ in range(5):
        probe.train_step(latents, labels, args.batch_size, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    n_cal = 20 if not args.smoke else 3
    for _ in range(n_cal):
        probe.train_step(latents, labels, args.batch_size, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_step = (time.time() - t0) / n_cal
    t0 = time.time()
    compute_stats(generate(probe.ema_model(), process, ae_eval, args.eval_samples, args, 0), extractor)
    t_eval = time.time() - t0 + 1.0
    del probe
    n_evals = 2 * len(args.eval_fractions)
    remaining = args.budget_s - (time.time() - t_setup) - n_evals * t_eval - 5.0
    steps = int(min(args.steps, max(remaining, 0) / (2 * t_step * 1.03)))
    if args.smoke:
        steps = max(steps, 8)  # the smoke run exercises every code path even on a slow machine
    if steps < 8:
        raise RuntimeError(
            f"budget too small: {remaining:.0f}s left for training at {t_step * 1e3:.1f} ms/step"
        )
    eval_at = sorted({max(1, int(round(f * steps))) for f in args.eval_fractions})
    log(
        f"calibration: {t_step * 1e3:.2f} ms/step (aligned), eval {t_eval:.1f}s -> {steps} steps per run, "
        f"evaluations at {eval_at}"
    )

    results = {}
    for name, aligned in (("vanilla", False), ("aligned", True)):
        run = Run(args, info, process, ae, aligned, device, args.seed)
        curve = {"step": [], "fd": [], "val_loss": [], "train_loss": []}
        window, t_w, last_logs = [], None, {}
        while run.step < steps:
            if device.type == "cuda" and run.step % 50 == 0:
                torch.cuda.synchronize()
                now = time.perf_counter()
                if t_w is not None and run.step > 50:
                    window.append((now - t_w) / 50)
                t_w = now
            elif device.type != "cuda":
                now = time.perf_counter()
                if t_w is not None and run.step > 2:
                    window.append(now - t_w)
                t_w = now
            last_logs = run.train_step(latents, labels, args.batch_size, bf16)
            if run.step in eval_at:
                te = time.time()
                model = run.ema_model()
                images = generate(model, process, ae_eval, args.eval_samples, args, 12345)
                stats = compute_stats(images, extractor)
                curve["step"].append(run.step)
                curve["fd"].append(fd(stats, ref))
                curve["val_loss"].append(val_loss(model, process, val_x, val_y, 777))
                curve["train_loss"].append(
                    float(last_logs.get("loss_denoise", last_logs.get("loss_mse", 0.0)))
                )
                log(
                    f"{name} step {run.step}: fd_{extractor.name} {curve['fd'][-1]:.3f}  val_loss "
                    f"{curve['val_loss'][-1]:.4f}  ({time.time() - te:.1f}s eval)"
                )
                if run.step == eval_at[-1] and images.shape[0] >= 100:
                    save_grid(images[:100].float() / 127.5 - 1, out / f"samples_{name}.png", nrow=10)
                t_w = None  # do not count evaluation time as step time
        step_time = float(np.median(window)) if window else float("nan")
        entry = {"curve": curve, "step_time_s": step_time, "steps": steps}
        if aligned:
            entry["flops_overhead"] = alignment_flops_overhead(run.model, run.loss_fn.projector)
            entry["projector_params"] = sum(p.numel() for p in run.loss_fn.parameters())
            assert isinstance(run.loss_fn, AlignedLoss)
        results[name] = entry
        log(f"{name}: median step {step_time * 1e3:.2f} ms")
        del run

    van, ali = results["vanilla"], results["aligned"]
    summary = {
        "steps_per_run": steps,
        "eval_steps": eval_at,
        "step_time_overhead": ali["step_time_s"] / van["step_time_s"] - 1.0,
        "flops_overhead_analytic": ali["flops_overhead"],
        "projector_params": ali["projector_params"],
    }
    for key in ("fd", "val_loss"):
        target = van["curve"][key][-1]
        s = crossing_step(ali["curve"]["step"], ali["curve"][key], target)
        summary[f"{key}_vanilla_final"] = target
        summary[f"{key}_aligned_final"] = ali["curve"][key][-1]
        summary[f"{key}_aligned_steps_to_vanilla_final"] = s
        summary[f"{key}_speedup"] = (steps / s) if s else None
    protocol = {
        "metric": f"fd_{extractor.name}",
        "features": extractor.protocol(),
        "eval_samples": args.eval_samples,
        "reference": f"{src['name']} train, first {ref.n} images at {ref_size}px",
        "solver": args.solver,
        "sample_steps": args.sample_steps,
        "guidance": "none",
        "weights": "EMA",
        "ema_decay": args.ema,
        "labels": "cycling 0..K-1",
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    setup = {k: v for k, v in vars(args).items()}
    setup.update(
        latent_shape=[info.channels, info.image_size, info.image_size],
        autoencoder=ae.config(),
        tokens=(info.image_size // args.patch) ** 2,
    )
    report = {
        "summary": summary,
        "runs": results,
        "protocol": protocol,
        "setup": setup,
        "seconds": time.time() - t_start,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    write_table(out, report, extractor.name)
    plot(out, report, extractor.name)
    log(
        f"done in {time.time() - t_start:.1f}s: speed-up (fd) {summary['fd_speedup']}, step-time overhead "
        f"{summary['step_time_overhead'] * 100:+.1f}% "
        f"(analytic FLOPs {summary['flops_overhead_analytic'] * 100:.2f}%)"
    )
    return report


def _fmt(v, spec=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_table(out: Path, report: dict, metric: str) -> None:
    s, r = report["summary"], report["runs"]
    lines = [
        f"| step | fd_{metric} vanilla | fd_{metric} aligned | val loss vanilla | val loss aligned |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, step in enumerate(r["vanilla"]["curve"]["step"]):
        v, a = r["vanilla"]["curve"], r["aligned"]["curve"]
        lines.append(
            f"| {step} | {_fmt(v['fd'][i])} | {_fmt(a['fd'][i])} | {_fmt(v['val_loss'][i], '.4f')} | "
            f"{_fmt(a['val_loss'][i], '.4f')} |"
        )
    sp = s["fd_speedup"]
    lines += [
        "",
        f"- steps per run: {s['steps_per_run']}; median step time vanilla "
        f"{r['vanilla']['step_time_s'] * 1e3:.2f} ms, aligned {r['aligned']['step_time_s'] * 1e3:.2f} ms "
        f"(overhead {s['step_time_overhead'] * 100:+.1f}%; analytic FLOPs overhead "
        f"{s['flops_overhead_analytic'] * 100:.2f}%)",
        f"- fd: aligned reaches vanilla's final {_fmt(s['fd_vanilla_final'])} at step "
        f"{_fmt(s['fd_aligned_steps_to_vanilla_final'], '.0f')} -> speed-up "
        f"{_fmt(sp, '.2f') + 'x' if sp else 'not reached'}",
        f"- val loss: aligned reaches vanilla's final {_fmt(s['val_loss_vanilla_final'], '.4f')} at step "
        f"{_fmt(s['val_loss_aligned_steps_to_vanilla_final'], '.0f')} -> speed-up "
        f"{_fmt(s['val_loss_speedup'], '.2f') + 'x' if s['val_loss_speedup'] else 'not reached'}",
        f"- protocol: {json.dumps(report['protocol'], default=str)}",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, report: dict, metric: str) -> None:
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for name, style in (("vanilla", "o-"), ("aligned", "s-")):
        c = report["runs"][name]["curve"]
        axes[0].plot(c["step"], c["fd"], style, label=name)
        axes[1].plot(c["step"], c["val_loss"], style, label=name)
    axes[0].set(
        xlabel="training step",
        ylabel=f"fd_{metric} (n={report['protocol']['eval_samples']})",
        title="sample quality (lower is better)",
    )
    axes[1].set(xlabel="training step", ylabel="held-out flow-matching loss", title="denoising loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)


if __name__ == "__main__":
    main()
