"""Does SRA² VAE-feature alignment (arXiv 2601.17830) speed up DiT training? A pre-registered A/B/A run.

Three arms of the same latent DiT, each a ``Trainer(DenoisingObjective(...))`` of the training engine,
run one after the other in this process:

* ``aligned:0``  flow matching + ``loss.align`` (the paper's head: 5-layer MLP, widths 2D, block from
  the model depth, Smooth-L1 beta 0.05 to the clean latent, weight 1, every t), seed 0;
* ``vanilla:0``  flow matching alone, seed 0 -- the same initial DiT weights, data order, flips, t,
  noise and label dropout as the aligned arm;
* ``vanilla:1``  flow matching alone, seed 1 -- the A/A control: its distance to ``vanilla:0`` is the
  run-to-run noise a difference must exceed.

Every arm is evaluated on its EMA weights at the same steps: ``fd_<features>`` (Fréchet distance in
the metric classifier's feature space, or Inception with ``--features inception``) of
``--eval-samples`` class-balanced samples (same per-image seeds and classes in every arm, dpmpp_2m 20
steps, no guidance) against the training set's statistics, and the held-out flow-matching loss when
the dataset has a test split. The decision rule (docs/alignment.md, "Pre-registered protocol"):

    speed-up(b) = b / (steps the aligned arm needs to reach vanilla:0's fd at step b)
                  (log-log interpolation between evaluations; when the aligned arm never gets there,
                  (steps vanilla:0 needs for the aligned fd at b) / b, below 1)
    A/A(b)      = the same with vanilla:1 in place of the aligned arm
    counted     only when speed-up(b) > max(A/A(b), 1 / A/A(b), 1 + --min-effect), at b = 50 % and
                100 % of the budget

plus the step-time overhead of the aligned step (median seconds per step over the trainer's logging
windows, same process) and its analytic FLOPs overhead.

    python scripts/align_experiment.py --out runs/align14 --features CLASSIFIER_DIR --stats STATS.npz \\
        --time-budget-s 540 --export $OUT/align14                     # GPU (docs/alignment.md)
    python scripts/align_experiment.py --smoke --out /tmp/align_smoke   # CPU, every code path, ~15 s

Resumable: every arm writes ``<out>/<arm>/`` (engine checkpoints, ``metrics.jsonl``); the same command
again continues each arm from its latest checkpoint (``resume=auto``; a finished arm returns at
once), and the curves are read back from the ``metrics.jsonl`` files. ``--until STEP`` trains every
arm only up to STEP in this call (e.g. half the budget in each of two GPU calls: after the first one
the 50 % comparison is already complete); ``--time-budget-s`` stops the arm in progress cleanly with
a checkpoint before the call's time runs out. ``<out>/protocol.json`` pins the recipe: resuming with
a different one is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure

from difftools import checkpoint as ckpt_io
from difftools.data import build_dataset
from difftools.data.latents import AutoencoderMismatchError, LatentDataset, cache_latents
from difftools.device import default_device
from difftools.files import write_text_atomic
from difftools.generate import SampleSpec, generate_uint8
from difftools.loaded import Loaded
from difftools.losses import DenoisingLoss, build_loss
from difftools.losses.alignment import default_align_depth, default_widths
from difftools.losses.denoising import T_DISTRIBUTIONS
from difftools.metrics.classifier import class_accuracy, default_classifier
from difftools.metrics.distances import fd
from difftools.metrics.evaluate import reference_for
from difftools.metrics.features import ClassifierFeatures, PixelFeatures, build_extractor
from difftools.metrics.stats import compute_stats
from difftools.models.autoencoders import build_autoencoder
from difftools.models.dit import PRESETS, DiT
from difftools.process import make_process
from difftools.training import DenoisingObjective, Trainer, TrainerConfig
from difftools.training.denoising import SampleGrid
from difftools.training.metrics_log import MetricsLog
from difftools.training.state import BatchPlan

DEFAULT_ARMS = ("aligned:0", "vanilla:0", "vanilla:1")
BUDGET_FRACTIONS = (0.5, 1.0)  # where the speed-up is judged
#: arguments that define the experiment; a resumed run must repeat them (protocol.json)
PROTOCOL_KEYS = (
    "data", "image_size", "vae", "limit", "model", "hidden", "depth", "heads", "patch", "arms", "steps",
    "batch_size", "lr", "warmup", "ema", "t_dist", "class_dropout", "grad_clip", "align_depth",
    "align_weight", "align_beta", "align_features", "width_mult", "widths", "eval_fractions",
    "eval_samples", "solver", "sample_steps", "sample_seed", "ref_size", "val_items", "min_effect",
)


#: --smoke: pixel-space digits (identity autoencoder), a 4-block DiT, 8 steps per arm (~10 s on CPU)
SMOKE_DEFAULTS = dict(
    data="digits", image_size=16, vae="identity", limit=512, model="custom", hidden=32, depth=4, heads=2,
    patch=4, steps=8, batch_size=16, lr=1e-3, ema=0.9, eval_samples=32, eval_batch=32, sample_steps=3,
    features="pixels", val_items=32, ckpt_every=4, log_every=1, device="cpu",
)


class ProtocolMismatchError(ValueError):
    """A resumed experiment was given a different recipe than the one its protocol.json records."""


# ------------------------------------------------------------------------------------ arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="experiment directory (arms, latent cache, results)")
    p.add_argument("--export", default=None,
                   help="also copy the small result files (json, md, png, log; each < 16 MB) here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run on digits in pixel space: exercises every code path (~15 s)")
    # data
    p.add_argument("--data", default="cifar10")
    p.add_argument("--root", default=None, help="data folder (default $DIFFTOOLS_DATA; see docs/data.md)")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this before encoding")
    p.add_argument("--vae", default="taef2")
    p.add_argument("--vae-path", default=None)
    p.add_argument("--limit", type=int, default=None, help="cache only the first N training images")
    p.add_argument("--cache", default=None, help="latent cache dir (default <out>/latents); reused if valid")
    # model
    p.add_argument("--model", default="DiT-S/1",
                   help="DiT-<T|S|B|L|XL>/<patch> (any patch dividing the latent size), or 'custom' with "
                        "--hidden/--depth/--heads/--patch")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--patch", type=int, default=None)
    p.add_argument("--class-dropout", type=float, default=0.1)
    # recipe (the paper's: SiT / REPA -- uniform t, AdamW 1e-4, batch 256, no warmup, clip 1)
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                   help="KIND:SEED with KIND vanilla | aligned | alignedxM (projector widths M*D), e.g. "
                        "'vanilla:0 vanilla:1 aligned:0 alignedx0.5:0'")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps per arm (the budget)")
    p.add_argument("--until", type=int, default=None,
                   help="train every arm only up to this step in this call")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--t-dist", default="uniform", choices=T_DISTRIBUTIONS)
    # alignment head
    p.add_argument("--align-depth", type=int, default=None,
                   help="aligned block (default: from the model depth)")
    p.add_argument("--align-weight", type=float, default=1.0)
    p.add_argument("--align-beta", type=float, default=0.05)
    p.add_argument("--align-features", default="latent", choices=("latent", "encoder"))
    p.add_argument("--width-mult", type=float, default=2.0,
                   help="projector hidden widths = M * D for 'aligned' arms (the paper's head: 2)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="explicit projector widths instead")
    # evaluation
    p.add_argument("--eval-fractions", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5, 0.75, 1.0])
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sample-seed", type=int, default=12345)
    p.add_argument("--features", default=None,
                   help="metric features: a classifier checkpoint dir, 'inception', or 'pixels' "
                        "(default: the dataset's cached metric classifier, trained once if missing)")
    p.add_argument("--stats", nargs="+", default=None,
                   help="reference statistics files (scripts/fid.py --save-stats) instead of the dataset")
    p.add_argument("--ref-size", type=int, default=None,
                   help="resolution of the reference images and features (default: 32 for cifar10, "
                        "else the source size)")
    p.add_argument("--val-items", type=int, default=512, help="test latents for the held-out loss (0 = off)")
    p.add_argument("--min-effect", type=float, default=0.05,
                   help="a speed-up counts only above max(A/A gap, 1 + this) (pre-registered: 0.05)")
    # machinery
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on with CUDA")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="wall-clock seconds for this call; the arm in progress stops with a checkpoint "
                        "in time to write the results (resume with the same command)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke", action="store_true")
    if pre.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE_DEFAULTS)  # defaults only: options given on the command line still win
    args = p.parse_args(argv)
    if args.smoke and args.threads is None:
        args.threads = 1  # two threads per process oversubscribe a shared 2-core box
    arch = resolve_architecture(args)
    args.hidden, args.depth, args.heads, args.patch = arch
    args.arms = [parse_arm(a) for a in args.arms]
    if len({a.name for a in args.arms}) != len(args.arms):
        p.error(f"--arms lists an arm twice: {[a.spec for a in args.arms]}")
    if not any(a.kind == "vanilla" for a in args.arms):
        p.error("--arms needs a vanilla arm (the reference)")
    for f in args.eval_fractions:
        if not 0 < f <= 1:
            p.error(f"--eval-fractions must be in (0, 1], got {f}")
    for f in BUDGET_FRACTIONS:
        if f not in args.eval_fractions:
            p.error(f"--eval-fractions must include {f}: the speed-up is judged at 50 % and 100 % "
                    "of the budget")
    if args.until is not None and not 1 <= args.until <= args.steps:
        p.error(f"--until must be in 1..--steps ({args.steps}), got {args.until}")
    return args


def resolve_architecture(args) -> tuple[int, int, int, int]:
    """(hidden, depth, heads, patch) from ``--model`` (a preset name with any patch) or the explicit flags."""
    if args.model == "custom":
        arch = (args.hidden, args.depth, args.heads, args.patch)
        if any(v is None for v in arch):
            raise SystemExit("error: --model custom needs --hidden, --depth, --heads and --patch")
        return arch
    name, _, patch = args.model.partition("/")
    if name not in PRESETS or not patch.isdigit() or int(patch) < 1:
        sizes = "|".join(k[4:] for k in PRESETS)
        raise SystemExit(f"error: --model {args.model!r}: expected DiT-<{sizes}>/<patch> or custom")
    hidden, depth, heads = PRESETS[name]
    return (args.hidden or hidden, args.depth or depth, args.heads or heads, args.patch or int(patch))


class Arm(NamedTuple):
    """One training run of the experiment: ``vanilla`` or ``aligned`` (projector widths
    ``width_mult * D``; None = the ``--width-mult`` / ``--widths`` default), with its seed."""

    kind: str
    seed: int
    width_mult: float | None = None

    @property
    def aligned(self) -> bool:
        return self.kind == "aligned"

    @property
    def spec(self) -> str:
        kind = self.kind + (f"x{self.width_mult:g}" if self.width_mult is not None else "")
        return f"{kind}:{self.seed}"

    @property
    def name(self) -> str:
        """Directory name, e.g. ``aligned_s0``, ``aligned_x0.5_s0``."""
        mult = f"_x{self.width_mult:g}" if self.width_mult is not None else ""
        return f"{self.kind}{mult}_s{self.seed}"


def parse_arm(spec: str) -> Arm:
    kind, sep, seed = spec.partition(":")
    bad = SystemExit(f"error: --arms {spec!r}: expected KIND:SEED, KIND = vanilla | aligned | alignedxM "
                     "(M > 0: projector widths M * D), e.g. aligned:0 or alignedx0.5:1")
    if not sep or not seed.lstrip("-").isdigit():
        raise bad
    if kind == "vanilla" or kind == "aligned":
        return Arm(kind, int(seed))
    if kind.startswith("alignedx"):
        try:
            mult = float(kind[len("alignedx"):])
        except ValueError:
            raise bad from None
        if mult > 0:
            return Arm("aligned", int(seed), mult)
    raise bad


def protocol_of(args) -> dict:
    out = {}
    for k in PROTOCOL_KEYS:
        v = getattr(args, k)
        out[k] = [a.spec for a in v] if k == "arms" else v
    return json.loads(json.dumps(out))  # tuples -> lists, as the file holds them


def check_protocol(out: Path, protocol: dict, log) -> None:
    """``<out>/protocol.json`` pins the recipe once an arm has trained; a later call must repeat it."""
    path = out / "protocol.json"
    if path.is_file():
        saved = ckpt_io.read_json(path)
        diff = {k: (saved.get(k), protocol.get(k)) for k in sorted(set(saved) | set(protocol))
                if saved.get(k) != protocol.get(k)}
        trained = sorted(str(f.parent.name) for f in out.glob("*/metrics.jsonl"))
        if diff and trained:
            lines = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ProtocolMismatchError(
                f"{path} records another recipe than this command ({lines}), and arms {trained} have "
                "trained with it. Resuming would mix two experiments: repeat the recorded options, or "
                "start a new one with another --out.")
        if diff:
            log(f"{path}: no arm has trained yet; replacing the recorded recipe ({sorted(diff)})")
    write_text_atomic(path, json.dumps(protocol, indent=1))


# ------------------------------------------------------------------------------------ data
def prepare_latents(args, device, log):
    """Cache (or reuse) the train / test latents: (train LatentDataset, test LatentDataset or None, ae)."""
    kw = {"path": args.vae_path} if args.vae_path else {}
    ae = build_autoencoder(args.vae, **kw)
    cache = Path(args.cache) if args.cache else Path(args.out) / "latents"
    sets = {}
    for split in ("train", "test"):
        if split == "test" and args.val_items <= 0:
            sets[split] = None
            continue
        d = cache / split
        try:
            sets[split] = LatentDataset(d, autoencoder=ae, random_flip=(split == "train"))
            log(f"reusing latent cache {d} ({len(sets[split])} items)")
            continue
        except (FileNotFoundError, AutoencoderMismatchError, ValueError) as e:
            log(f"building latent cache {d}: {type(e).__name__}")
        try:
            ds = build_dataset(args.data, root=args.root, split=split, image_size=args.image_size)
        except FileNotFoundError as e:
            if split == "train":
                raise
            log(f"no {split} split ({e}); the held-out loss is left out")
            sets[split] = None
            continue
        t0 = time.time()
        limit = args.limit if split == "train" else min(args.limit or 10**9, args.val_items)
        cache_latents(ds, ae, d, flip=(split == "train"), batch_size=500, device=device, limit=limit,
                      scale_images=2048)
        log(f"  encoded {split} in {time.time() - t0:.1f}s")
        sets[split] = LatentDataset(d, autoencoder=ae, random_flip=(split == "train"))
    return sets["train"], sets["test"], ae


class DeviceBatches:
    """The engine's data order (:class:`BatchPlan`: epoch e = ``randperm`` seeded ``seed + e`` and one
    flip bit per item) served from latents already on the device: batch k is a pure function of
    (seed, k), so arms with the same seed see the same batches and a resumed arm continues exactly.
    Each epoch's indices go to the device once, so a step has no host-device copy."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.latents, self.labels = latents, labels
        self.plan = BatchPlan(latents.shape[0], batch_size, seed=seed, flip=True)
        self._epoch, self._idx, self._flip = -1, None, None

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = self.plan.position(k)
        if epoch != self._epoch:
            first = epoch * self.plan.batches_per_epoch
            keys = [self.plan.indices(first + j) for j in range(self.plan.batches_per_epoch)]
            keys = torch.tensor(keys, dtype=torch.long)  # [batches, B, 2] = (index, flip)
            self._idx, self._flip = keys[..., 0].to(self.latents.device), keys[..., 1].to(self.latents.device)
            self._epoch = epoch
        idx, flip = self._idx[b], self._flip[b]
        return self.latents[idx, flip].float(), self.labels[idx]


class ArmObjective(DenoisingObjective):
    """The DiT recipe with the data on the device and an evaluation hook (fd + held-out loss)."""

    def __init__(self, model, loss_fn, process, *, autoencoder, dataset_info, data: DeviceBatches,
                 evaluator, grid: SampleGrid):
        super().__init__(model, loss_fn, process, "flow", autoencoder=autoencoder, dataset_info=dataset_info,
                         grid=grid)
        self.data = data
        self.evaluator = evaluator

    def batches(self, start, run):
        if run.world_size != 1:
            raise ValueError("scripts/align_experiment.py runs on one process (its arms are short)")
        return (self.data.batch(k) for k in _count(start))

    def evaluate(self, ema_model, step):
        return self.evaluator(ema_model, step)

    def preview(self, ema_model, step, samples_dir):
        return super().preview(self.evaluator.eval_model(ema_model), step, samples_dir)


def _count(start: int):
    k = start
    while True:
        yield k
        k += 1


# ------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """fd of the EMA model's samples to the reference statistics, class accuracy (classifier
    features), and the flow-matching loss on fixed held-out latents with fixed t and noise."""

    def __init__(self, args, process, autoencoder, extractor, reference, val, device):
        self.args, self.process, self.ae = args, process, autoencoder
        self.extractor, self.reference, self.val, self.device = extractor, reference, val, device
        self.spec = SampleSpec(sampler=args.solver, steps=args.sample_steps, seed=args.sample_seed).validate()
        self._model = None

    def eval_model(self, ema_model) -> torch.nn.Module:
        # an uncompiled copy: the engine's EMA copy of a compiled model would recompile per shape
        if self._model is None or self._model.config() != ema_model.config():
            with torch.random.fork_rng(devices=[]):  # its random init must not move the training's RNG
                self._model = DiT(**ema_model.config()).to(self.device).eval().requires_grad_(False)
        self._model.load_state_dict(ema_model.state_dict())
        return self._model

    def __call__(self, ema_model, step: int) -> dict:
        # The evaluation must not draw from the training's global RNG (the DiT built below
        # initialises its weights; label dropout reads the same RNG): otherwise when and where an
        # evaluation runs would change the training that follows it.
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return self._evaluate(ema_model)

    def _evaluate(self, ema_model) -> dict:
        t0 = time.time()
        model = self.eval_model(ema_model)
        run = Loaded(model, self.process, "flow", self.ae)
        n, batch = self.args.eval_samples, self.args.eval_batch
        images, labels, _ = generate_uint8(run, range(n), self.spec, batch, self.device)
        out = {"fd": fd(compute_stats(images, self.extractor), self.reference)}
        if isinstance(self.extractor, ClassifierFeatures) and labels is not None:
            out["class_acc"] = class_accuracy(self.extractor, images, labels)
        if self.val is not None:
            x0, y = self.val
            g = torch.Generator(device=x0.device).manual_seed(777)
            loss, _ = DenoisingLoss(self.process, prediction="flow", t_distribution="uniform")(model, x0, y,
                                                                                                generator=g)
            out["val_loss"] = float(loss)
        out["eval_seconds"] = time.time() - t0
        return out


def build_metric(args, src: dict, device, log):
    """(feature extractor, reference statistics)."""
    ref_size = args.ref_size
    if args.features == "pixels":
        extractor = PixelFeatures(channels=int(src.get("channels") or 3), device=device)
    elif args.features:
        extractor = build_extractor(args.features, device=device)
    else:
        extractor = default_classifier(src["name"], image_size=ref_size, root=args.root, device=device,
                                       log=log)
    cache = Path(args.out) / "cache" if args.smoke else None  # smoke runs leave the user's cache alone
    ref = reference_for(extractor, src["name"], ref_size, "train", args.root, args.stats or (), cache)
    return extractor, ref


# ------------------------------------------------------------------------------------ one arm
def build_model(args, info, seed: int) -> DiT:
    torch.manual_seed(seed)  # the arms with the same seed start from the same weights
    return DiT(input_size=info.image_size, in_channels=info.channels, patch_size=args.patch,
               hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, num_classes=info.num_classes,
               class_dropout_prob=args.class_dropout)


def loss_node(args, arm: Arm, hidden: int) -> dict:
    node = {"prediction": "flow", "t_distribution": args.t_dist}
    if arm.aligned:
        if arm.width_mult is not None:
            widths = default_widths(hidden, arm.width_mult)
        else:
            widths = args.widths or default_widths(hidden, args.width_mult)
        node["align"] = {"weight": args.align_weight, "depth": args.align_depth,
                         "features": args.align_features, "beta": args.align_beta, "widths": list(widths)}
    return node


def trainer_config(args, arm: Arm, eval_at: list[int], device, time_limit: float | None) -> TrainerConfig:
    return TrainerConfig(
        batch_size=args.batch_size, max_steps=args.until or args.steps, lr=args.lr, warmup_steps=args.warmup,
        lr_decay="constant", weight_decay=0.0, grad_clip=args.grad_clip, ema_decay=args.ema, seed=arm.seed,
        log_every=args.log_every, ckpt_every=args.ckpt_every, keep_last=1, eval_at=eval_at, sample_every=0,
        sample_num=100 if not args.smoke else 16, sample_solver=args.solver, sample_steps=args.sample_steps,
        progress=False, tensorboard=False, time_limit=time_limit, resume="auto",
        compile={"on": True, "off": False, "auto": device.type == "cuda"}[args.compile],
        device="cpu" if device.type == "cpu" else "auto", cpu_threads=args.threads,
    )


def run_arm(args, arm: Arm, ctx: dict, eval_at: list[int], time_limit: float | None, log) -> dict:
    info, process, ae = ctx["info"], ctx["process"], ctx["ae"]
    model = build_model(args, info, arm.seed)
    torch.manual_seed(10_000 + arm.seed)  # the projector's init; the engine reseeds before step 1
    loss_fn = build_loss(loss_node(args, arm, model.hidden_size), model, process, ae)
    grid = SampleGrid(num=100 if not args.smoke else 16, solver=args.solver, steps=args.sample_steps,
                      seed=args.sample_seed)
    objective = ArmObjective(model, loss_fn, process, autoencoder=ae, dataset_info=info,
                             data=DeviceBatches(ctx["latents"], ctx["labels"], args.batch_size, arm.seed),
                             evaluator=ctx["evaluator"], grid=grid)
    cfg = trainer_config(args, arm, eval_at, ctx["device"], time_limit)
    run_config = {"experiment": "scripts/align_experiment.py", "arm": arm.spec, "protocol": ctx["protocol"]}
    run_dir = Path(args.out) / arm.name
    evaluate_missing(run_dir, eval_at, model, ctx["evaluator"], log)
    result = Trainer(objective, cfg, run_dir, run_config=run_config).train()
    evaluate_missing(run_dir, eval_at, model, ctx["evaluator"], log)
    head = loss_fn.describe(model) if arm.aligned else None
    log(f"{arm.spec}: step {result.step} ({result.stopped_by}, {result.seconds:.0f}s)"
        + (f"; head {head}" if head else ""))
    return {"step": result.step, "stopped_by": result.stopped_by, "head": head}


def checkpoint_step(run_dir: Path) -> int | None:
    """Step of the arm's latest checkpoint (None before its first)."""
    latest = ckpt_io.read_latest(run_dir / "checkpoints")
    if latest is None or not latest.is_dir():
        return None
    return int(ckpt_io.read_json(latest / ckpt_io.STATE_DIR / "trainer.json")["step"])


def evaluate_missing(run_dir: Path, eval_at: list[int], model: DiT, evaluator, log) -> None:
    """Evaluate the latest checkpoint's EMA weights when its step is an evaluation step that
    metrics.jsonl lacks: a call that ended between writing that checkpoint and evaluating it
    (the engine checkpoints first) resumes after the step and would never evaluate it."""
    step = checkpoint_step(run_dir)
    if step is None or step not in eval_at or step in read_curves(run_dir)["curve"]["step"]:
        return
    latest = ckpt_io.read_latest(run_dir / "checkpoints")
    with torch.random.fork_rng(devices=[]):  # building a DiT draws initial weights
        ema = DiT(**model.config())
    ema.load_state_dict(ckpt_io.load_weights(latest / ckpt_io.EMA_FILE))
    numbers = evaluator(ema, step)
    record = {"step": step, **{f"eval/{k}": v for k, v in numbers.items()}}
    MetricsLog(run_dir, tensorboard=False).write(record)
    log(f"{run_dir.name}: evaluated {latest.name} (its evaluation was missing)")


# ------------------------------------------------------------------------------------ analysis
def read_curves(run_dir: Path) -> dict:
    """Evaluations and step times from an arm's metrics.jsonl (the last record of a step wins:
    a step evaluated again after a resume replaces the first)."""
    evals, step_s = {}, []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "eval/fd" in rec:
                evals[int(rec["step"])] = {k[5:]: v for k, v in rec.items() if k.startswith("eval/")}
            elif rec.get("it_per_s"):
                step_s.append(1.0 / rec["it_per_s"])
    steps = sorted(evals)
    curve = {"step": steps}
    for key in ("fd", "val_loss", "class_acc", "eval_seconds"):
        if steps and all(key in evals[s] for s in steps):
            curve[key] = [evals[s][key] for s in steps]
    return {"curve": curve, "step_time_s": float(np.median(step_s)) if step_s else None,
            "log_windows": len(step_s)}


def steps_to_reach(steps, values, target):
    """First step at which the curve gets to ``target`` or below, interpolated log-log (power-law
    segments) between evaluations. Returns (step, note): note "before first evaluation" (step is
    then the first evaluated step, an upper bound) or "not reached" (step None)."""
    for i, (s, v) in enumerate(zip(steps, values, strict=True)):
        if v <= target:
            if i == 0:
                return float(s), "before first evaluation"
            s0, v0 = steps[i - 1], values[i - 1]
            if v0 == v:
                return float(s), ""
            frac = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(v))
            return math.exp(math.log(s0) + frac * (math.log(s) - math.log(s0))), ""
    return None, "not reached"


def speedup(ref: dict, other: dict, budget_step: int, key: str = "fd") -> dict:
    """Convergence speed-up of ``other`` over ``ref`` at ``budget_step`` (module docstring)."""
    if budget_step not in ref["step"] or budget_step not in other["step"]:
        return {"value": None, "note": "not evaluated yet"}
    i_ref, i_oth = ref["step"].index(budget_step), other["step"].index(budget_step)
    f_ref, f_oth = ref[key][i_ref], other[key][i_oth]
    out = {f"{key}_ref": f_ref, f"{key}_other": f_oth}
    s, note = steps_to_reach(other["step"], other[key], f_ref)
    if s is not None:
        out.update(value=budget_step / s, steps_other=s, note=("lower bound: " + note) if note else "")
        return out
    s, note = steps_to_reach(ref["step"], ref[key], f_oth)  # other slower: how early ref was there
    out.update(value=s / budget_step, steps_ref=s, note=("upper bound: " + note) if note else "")
    return out


def verdict(sp: float | None, aa: float | None, min_effect: float) -> str:
    """The pre-registered reading of a speed-up ``sp`` given the A/A control's ``aa``."""
    if sp is None or aa is None:
        return "undetermined (missing evaluations)"
    band = max(aa, 1.0 / aa, 1.0 + min_effect)
    if sp > band:
        return "faster (beyond the A/A gap)"
    if sp < 1.0 / band:
        return "slower (beyond the A/A gap)"
    return "no effect distinguishable from seed noise"


def analyse(args, arms: list[Arm], runs: dict) -> dict:
    """Speed-ups at 50 % / 100 % of the budget against the first vanilla arm, the A/A control (the
    second vanilla arm), verdicts, step-time and FLOPs overheads."""
    vanillas = [a for a in arms if a.kind == "vanilla"]
    ref, aa_arm = vanillas[0], (vanillas[1] if len(vanillas) > 1 else None)
    budgets = {f: int(round(f * args.steps)) for f in BUDGET_FRACTIONS}
    summary = {"reference": ref.spec, "aa_control": aa_arm.spec if aa_arm else None, "budgets": budgets,
               "arms": {}}
    ref_curve = runs[ref.name]["curve"]
    aa = {}
    if aa_arm is not None:
        for f, b in budgets.items():
            aa[f] = {k: speedup(ref_curve, runs[aa_arm.name]["curve"], b, k)
                     for k in ("fd", "val_loss") if k in ref_curve and k in runs[aa_arm.name]["curve"]}
        summary["aa"] = {str(f): v for f, v in aa.items()}
    for arm in arms:
        if not arm.aligned:
            continue
        entry, curve = {}, runs[arm.name]["curve"]
        for f, b in budgets.items():
            row = {}
            for key in ("fd", "val_loss"):
                if key not in ref_curve or key not in curve:
                    continue
                sp = speedup(ref_curve, curve, b, key)
                aa_v = aa.get(f, {}).get(key, {}).get("value")
                row[key] = {**sp, "aa": aa_v, "verdict": verdict(sp.get("value"), aa_v, args.min_effect)}
            entry[str(f)] = row
        same_seed = next((a for a in vanillas if a.seed == arm.seed), ref)
        t_a, t_v = runs[arm.name]["step_time_s"], runs[same_seed.name]["step_time_s"]
        entry["step_time_overhead"] = (t_a / t_v - 1.0) if t_a and t_v else None
        entry["step_time_vs"] = same_seed.spec
        entry["head"] = runs[arm.name].get("head")
        summary["arms"][arm.spec] = entry
    return summary


# ------------------------------------------------------------------------------------ reports
def _fmt(v, spec=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_table(out: Path, report: dict) -> Path:
    arms, runs, s = report["arms"], report["runs"], report["summary"]
    metric = report["protocol_eval"]["metric"]
    all_steps = sorted({st for a in arms for st in runs[a]["curve"]["step"]})
    head = "| step | " + " | ".join(f"{metric} {a}" for a in arms) + " |"
    lines = [head, "|---:|" + "---:|" * len(arms)]
    for st in all_steps:
        cells = []
        for a in arms:
            c = runs[a]["curve"]
            cells.append(_fmt(c["fd"][c["step"].index(st)]) if st in c["step"] and "fd" in c else "")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | budget | speed-up (fd) | A/A | verdict | speed-up (val loss) | A/A | verdict |",
              "|---|---:|---:|---:|---|---:|---:|---|"]
    for arm, entry in s["arms"].items():
        for f in BUDGET_FRACTIONS:
            row = entry.get(str(f), {})
            fd_r, vl_r = row.get("fd", {}), row.get("val_loss", {})
            lines.append(
                f"| {arm} | {f:.0%} (step {s['budgets'][f]}) | {_fmt(fd_r.get('value'), '.2f')}x "
                f"{fd_r.get('note', '')} | {_fmt(fd_r.get('aa'), '.2f')}x | {fd_r.get('verdict', 'n/a')} | "
                f"{_fmt(vl_r.get('value'), '.2f')}x | {_fmt(vl_r.get('aa'), '.2f')}x | "
                f"{vl_r.get('verdict', 'n/a')} |")
    lines.append("")
    for arm, entry in s["arms"].items():
        head = entry.get("head") or {}
        flops = head.get("flops_overhead")
        step = entry["step_time_overhead"]
        ms = {a: runs[a]["step_time_s"] * 1e3 if runs[a]["step_time_s"] else None for a in arms}
        times = ", ".join(f"{a} {_fmt(v, '.2f')} ms" for a, v in ms.items())
        lines.append(
            f"- {arm}: head depth {head.get('depth')}, widths {head.get('widths')}, "
            f"{_fmt((head.get('params') or 0) / 1e6, '.2f')} M params, analytic FLOPs overhead "
            f"{_fmt(100 * flops if flops is not None else None, '.2f')} %; step-time overhead vs "
            f"{entry['step_time_vs']} {_fmt(100 * step if step is not None else None, '+.1f')} % "
            f"(median time per step: {times})")
    lines.append(f"- complete: {report['complete']}; steps reached: "
                 + ", ".join(f"{a} {runs[a]['step']}" for a in arms))
    lines.append(f"- evaluation: {json.dumps(report['protocol_eval'], default=str)}")
    lines.append(f"- recipe: {json.dumps(report['protocol'], default=str)}")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(out: Path, report: dict) -> Path:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    styles = ("s-", "o-", "^--", "d-", "v-", "x-")
    for i, (name, run) in enumerate(report["runs"].items()):
        c = run["curve"]
        if c.get("fd"):
            axes[0].plot(c["step"], c["fd"], styles[i % len(styles)], label=report["arms"][name])
        if c.get("val_loss"):
            axes[1].plot(c["step"], c["val_loss"], styles[i % len(styles)], label=report["arms"][name])
    ev = report["protocol_eval"]
    axes[0].set(xlabel="training step", ylabel=f"{ev['metric']} (n={ev['eval_samples']})", xscale="log",
                yscale="log", title="sample quality, EMA (lower is better)")
    axes[1].set(xlabel="training step", ylabel="held-out flow-matching loss", xscale="log",
                title="denoising loss, EMA")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path = out / "curve.png"
    fig.savefig(path, dpi=110)
    return path


def write_reports(args, out: Path, arm_status: dict, eval_at: list[int], extractor, ref, device,
                  t_start: float) -> dict:
    """results.json / results.md / curve.png / samples_<arm>.png from every arm's metrics.jsonl
    (arms of earlier calls included), copied to ``--export``."""
    runs = {arm.name: {**read_curves(out / arm.name), **arm_status[arm.name]} for arm in args.arms}
    for arm in args.arms:  # not run in this call: where its checkpoints got to
        if runs[arm.name]["step"] is None:
            runs[arm.name]["step"] = checkpoint_step(out / arm.name)
    report = {
        "complete": all(r["step"] == args.steps and r["curve"]["step"] == eval_at for r in runs.values()),
        "arms": {a.name: a.spec for a in args.arms},
        "runs": runs,
        "summary": analyse(args, args.arms, runs),
        "protocol": protocol_of(args),
        "protocol_eval": {
            "metric": f"fd_{extractor.name}", "features": extractor.protocol(), "reference": ref.source,
            "reference_n": ref.n, "eval_samples": args.eval_samples, "solver": args.solver,
            "sample_steps": args.sample_steps, "sample_seed": args.sample_seed, "guidance": "none",
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "weights": "EMA", "labels": "i mod num_classes", "eval_steps": eval_at,
            "interpolation": "log-log between evaluations",
        },
        "machine": {"device": str(device), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "seconds_this_call": time.time() - t_start,
    }
    write_text_atomic(out / "results.json", json.dumps(report, indent=1, default=str))
    write_table(out, report)
    plot(out, report)
    for arm in args.arms:  # the latest sample grid of every arm
        grids = sorted((out / arm.name / "samples").glob("step_*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / f"samples_{arm.name}.png")
    if args.export:
        export = Path(args.export)
        export.mkdir(parents=True, exist_ok=True)
        for f in ["results.json", "results.md", "curve.png", "log.txt", "protocol.json",
                  *[p.name for p in out.glob("samples_*.png")]]:
            if (out / f).is_file() and (out / f).stat().st_size < 16e6:
                shutil.copyfile(out / f, export / f)
    return report


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg):
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    try:
        return _main(args, out, t_start, log)
    finally:
        logf.close()


def _main(args, out: Path, t_start: float, log) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    if args.ref_size is None:
        args.ref_size = 32 if args.data == "cifar10" else args.image_size
    protocol = protocol_of(args)
    check_protocol(out, protocol, log)
    log(f"recipe: {json.dumps(protocol)}")

    train_set, test_set, ae = prepare_latents(args, device, log)
    info, src = train_set.info, train_set.source_info
    ae_eval = ae if args.vae != "identity" else None
    extractor, ref = build_metric(args, src, device, log)
    val = None
    if test_set is not None:
        n_val = min(args.val_items, len(test_set))
        val = (test_set.latents[:n_val, 0].float().to(device), test_set.labels[:n_val].to(device))
    eval_at = sorted({max(1, int(round(f * args.steps))) for f in args.eval_fractions})
    ctx = {
        "info": info, "process": make_process("flow"), "ae": ae_eval, "device": device, "protocol": protocol,
        "latents": train_set.latents.to(device), "labels": train_set.labels.to(device),
    }
    ctx["evaluator"] = Evaluator(args, ctx["process"], ae_eval, extractor, ref, val, device)
    depth = args.align_depth or default_align_depth(args.depth)
    log(f"setup done: {len(train_set)} training latents {list(ctx['latents'].shape[1:])}, "
        f"metric fd_{extractor.name} vs {ref.source} (n={ref.n}); DiT hidden {args.hidden}, "
        f"{args.depth} blocks, "
        f"patch {args.patch} ({(info.image_size // args.patch) ** 2} tokens), aligned block {depth}; "
        f"evaluations at {eval_at}")

    deadline = t_start + args.time_budget_s if args.time_budget_s else None
    reserve = 30.0  # for the stop's checkpoint, sample grid and evaluation, and the reports
    arm_status = {a.name: {"step": None, "stopped_by": "not started", "head": None} for a in args.arms}
    report = None
    for arm in args.arms:
        time_limit = None
        if deadline is not None:
            time_limit = deadline - reserve - time.time()
            if time_limit <= 0:
                log(f"{arm.spec}: not started, the call's time budget is spent (run the command again)")
                continue
        arm_status[arm.name] = run_arm(args, arm, ctx, eval_at, time_limit, log)
        # after every arm, so that a call cut short still leaves (and exports) what it measured
        report = write_reports(args, out, arm_status, eval_at, extractor, ref, device, t_start)
    if report is None:
        report = write_reports(args, out, arm_status, eval_at, extractor, ref, device, t_start)
    complete = report["complete"]
    status = "complete" if complete else "INCOMPLETE: run the same command again to continue"
    log(f"{status}; results in {out / 'results.md'}")
    for arm, entry in report["summary"]["arms"].items():
        for f in BUDGET_FRACTIONS:
            r = entry.get(str(f), {}).get("fd", {})
            log(f"{arm} at {f:.0%}: speed-up (fd) {_fmt(r.get('value'), '.2f')}x, "
                f"A/A {_fmt(r.get('aa'), '.2f')}x -> {r.get('verdict', 'n/a')}")
    return report


if __name__ == "__main__":
    main()
