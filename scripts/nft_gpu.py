"""DiffusionNFT vs classifier-free guidance on a class-conditional flow DiT (issue 15's GPU acceptance).

Two subcommands:

``reference``: statistics of the real training images in a feature space (for the fd), computed
once where the training split is, e.g. ::

    python scripts/nft_gpu.py reference --features runs/nft_gpu/judge --data cifar10 \\
        --out runs/nft_gpu/reference.npz

``run``: the experiment, on one GPU within a deadline (default 7.5 minutes). Given the base model, a
reward classifier and a judge classifier trained on disjoint halves of the training split
(``python train/classifier.py data=cifar10 data.subset=0/2`` and ``... 1/2``), the reference
statistics and the fd feature space (default: the judge's features), it

1. evaluates the base with CFG at scales {1, 1.5, 2, 3, 4} (same sampler and steps as NFT, the
   same held-out seeds): judge accuracy, reward-classifier accuracy, fd and per-class diversity,
   at ``--eval-n`` (the scale the NFT curves are measured at) and ``--record-n`` (10,000 for the
   record);
2. runs NFT (``difftools.rl.recipe.run_nft``, conf/nft.yaml defaults plus ``--set`` overrides) at
   each ``--ref-weights`` value with seed 0, and once more with seed 1 at ``--repeat-weight``,
   each with a held-out evaluation every ``--eval-every`` iterations and a time limit that shares
   what is left of the deadline;
3. evaluates every run's best held-out checkpoint (judge accuracy, fd within 10 % of the base) and
   final EMA weights at ``--record-n``;
4. writes ``nft_gpu.json`` (every number, the settings, the timings and the two goals: a checkpoint
   on or beyond CFG's accuracy-fd frontier; a run with fd within 10 % of the base and judge accuracy
   +15 points), ``frontier.png`` (judge accuracy vs fd: CFG and NFT) and ``judge_vs_reward.png``
   (judge and reward accuracy over iterations: where the reward is hacked, they part).

``--smoke`` shrinks everything (n = 20, 2 iterations, 2-step sampler) to exercise every path on CPU
in seconds (tests/test_nft.py runs it on a tiny digits model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from samplers.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
CFG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
#: per-run settings of the GPU sweep (override with --set): 320 samples per iteration (10 labels x 32) in two
#: micro-batches of 160, accumulated into one optimizer step
GPU_SET = ["groups=20", "group_size=16", "train_batch=160", "collect_batch=1000"]
SMOKE = {
    "eval_n": 20,
    "record_n": 20,
    "iterations": 2,
    "eval_every": 1,
    "batch": 20,
    "run_seconds": 60.0,
    "set": [
        "groups=2",
        "group_size=4",
        "train_batch=4",
        "sampler.steps=2",
        "loss.t_per_sample=1",
        "device=cpu",
    ],
}


# ------------------------------------------------------------------ config
def compose(overrides: list[str]):
    """conf/nft.yaml with Hydra overrides, as ``python train/nft.py key=value ...`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("nft", overrides=overrides)


def run_overrides(args, ref_weight: float, seed: int, seconds: float) -> list[str]:
    return [
        f"base={args.base}",
        "reward=classifier",
        f"reward_opts.classifier={args.reward_clf}",
        f"loss.ref_weight={ref_weight}",
        f"seed={seed}",
        f"iterations={args.iterations}",
        f"time_limit={seconds:.1f}",
        f"eval.every={args.eval_every}",
        f"eval.judge={args.judge_clf}",
        f"eval.features={args.features or args.judge_clf}",
        f"eval.reference={args.reference}",
        f"eval.n={args.eval_n}",
        f"eval.seed={args.heldout_seed}",
        f"eval.batch={args.batch}",
        "ckpt_every=0",
        "keep_last=1",
        "sample_every=0",
        "sample_num=100",
        "progress=false",
        *merge_sets(GPU_SET, args.set),
    ]


def merge_sets(defaults: list[str], given: list[str]) -> list[str]:
    """``key=value`` overrides, later ones replacing earlier ones with the same key."""
    merged: dict[str, str] = {}
    for item in [*defaults, *given]:
        key, sep, _ = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value (a conf/nft.yaml key)")
        merged[key] = item
    return list(merged.values())


# ------------------------------------------------------------------ evaluation
def evaluator(args, cfg, n: int):
    """The held-out evaluation of the runs (the same seeds, sampler and feature spaces)."""
    from omegaconf import OmegaConf

    from difftools.rl.evaluation import HeldOutEval
    from difftools.rl.recipe import load_base

    device = "cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "cuda"
    base = load_base(args.base, device=device)
    ev = HeldOutEval(
        args.judge_clf,
        args.features or args.judge_clf,
        args.reference,
        process=base.process,
        prediction=base.prediction,
        num_classes=base.model.num_classes,
        n=n,
        seed=args.heldout_seed,
        sampler=OmegaConf.to_container(cfg.sampler),
        autoencoder=base.autoencoder,
        reward=args.reward_clf,
        batch=args.batch,
        device=device,
    )
    return ev, base, device


def autocast_for(device: str):
    """bf16 on CUDA (what the NFT runs sample with), off on CPU."""
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else None


def cfg_baseline(ev, model, device: str) -> list[dict]:
    out = []
    for scale in CFG_SCALES:
        t0 = time.perf_counter()
        record = ev(model, cfg_scale=scale, autocast=autocast_for(device))
        out.append({"cfg_scale": scale, **record, "seconds": time.perf_counter() - t0})
        print(
            f"  CFG {scale}: judge {record['judge_accuracy']:.3f} fd {record['fd']:.3f} "
            f"diversity {record['diversity']:.3f} (n={record['n']})",
            flush=True,
        )
    return out


def record_eval(ev, path: Path, device: str) -> dict:
    """The record-n evaluation of a checkpoint's EMA weights."""
    import difftools

    model = difftools.load(path, use_ema=True, device=device).model
    return {"checkpoint": str(path), **ev(model, autocast=autocast_for(device))}


# ------------------------------------------------------------------ the experiment
def run(args) -> dict:
    from difftools.rl.recipe import run_nft

    t_start = time.perf_counter()
    deadline = args.deadline_minutes * 60.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg0 = compose(run_overrides(args, 1e-4, 0, 1.0))
    ev_n, base, device = evaluator(args, cfg0, args.eval_n)
    ev_rec, _, _ = evaluator(args, cfg0, args.record_n)
    print(f"CFG baseline ({ev_n.metric}, held-out seed {args.heldout_seed}):", flush=True)
    t_base = time.perf_counter()
    baseline = {"eval_n": cfg_baseline(ev_n, base.model, device)}
    baseline["record_n"] = (
        baseline["eval_n"] if args.record_n == args.eval_n else cfg_baseline(ev_rec, base.model, device)
    )
    base.model.cpu()
    save_document(out, args, ev_rec, device, None, baseline, [], t_start, complete=False)
    # seconds per evaluated image without guidance (a guided image costs two), measured on the baseline
    images = sum(
        (1 if s == 1 else 2) * b["n"]
        for key in baseline
        for s, b in zip(CFG_SCALES, baseline[key], strict=True)
    ) / (1 if args.record_n != args.eval_n else 2)
    per_image = (time.perf_counter() - t_base) / images
    # outside a run's time limit: setup, its first and last held-out evaluations, two record evaluations
    overhead = args.overhead_seconds + per_image * (2 * args.eval_n + 2 * args.record_n)
    plan = [(w, 0) for w in args.ref_weights] + [(args.repeat_weight, 1)]
    runs = []
    for i, (weight, seed) in enumerate(plan):
        left = deadline - (time.perf_counter() - t_start)
        # what is left, shared by the runs still to go, less what each spends outside its time limit
        seconds = min(args.run_seconds, max(10.0, left / (len(plan) - i) - overhead))
        name = f"w{weight:g}_s{seed}"
        print(f"NFT {name}: ref_weight {weight:g}, seed {seed}, time limit {seconds:.0f} s", flush=True)
        t0 = time.perf_counter()
        result = run_nft(compose(run_overrides(args, weight, seed, seconds)), out / name)
        run_dir = out / name
        heldout = json.loads((run_dir / "heldout.json").read_text())
        train_records = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_records = [
            {
                k: r[k]
                for k in ("iteration", "reward_mean", "reward_accuracy", "ref_deviation", "x0_norm", "loss")
                if k in r
            }
            for r in train_records
            if "iteration" in r
        ]
        entry = {
            "name": name,
            "ref_weight": weight,
            "seed": seed,
            "iterations": result.iteration,
            "stopped_by": result.stopped_by,
            "train_seconds": result.seconds,
            "heldout": heldout,
            "train": train_records,
            "best": result.best,
            "final_record": record_eval(ev_rec, result.checkpoint, device),
        }
        if result.best is not None:
            entry["best_record"] = record_eval(ev_rec, run_dir / "best", device)
        entry["seconds"] = time.perf_counter() - t0
        runs.append(entry)
        save_document(out, args, ev_rec, device, per_image, baseline, runs, t_start, complete=False)
        print(
            f"  {result.iteration} iterations ({result.stopped_by}); best {result.best}; final record "
            f"judge {entry['final_record']['judge_accuracy']:.3f} fd {entry['final_record']['fd']:.3f}",
            flush=True,
        )
    doc = save_document(out, args, ev_rec, device, per_image, baseline, runs, t_start, complete=True)
    goals = doc["goals"]
    try:
        plot_frontier(doc, out / "frontier.png")
        plot_judge_vs_reward(doc, out / "judge_vs_reward.png")
    except ImportError as err:  # the numbers are saved; the plots can be drawn elsewhere
        print(f"no plots ({err}): run `python scripts/nft_gpu.py plot {out}` where matplotlib is installed")
    print(
        f"goals: {goals}\nwrote {out / 'nft_gpu.json'}, frontier.png, judge_vs_reward.png "
        f"({doc['seconds']:.0f} s)",
        flush=True,
    )
    return doc


def save_document(out: Path, args, ev_rec, device: str, per_image, baseline: dict, runs: list, t_start: float,
                  complete: bool) -> dict:
    """``nft_gpu.json`` with what is measured so far (written after the baseline and after every run, so a
    command stopped by its time limit keeps them; ``complete`` is true only at the end) and the goals of
    the runs finished so far."""
    from difftools.rl.evaluation import beyond_frontier

    frontier = [(b["judge_accuracy"], b["fd"]) for b in baseline["record_n"]]
    base_rec = baseline["record_n"][0]  # CFG scale 1 = no guidance
    points = [
        (r["name"], kind, r[kind]) for r in runs for kind in ("best_record", "final_record") if kind in r
    ]
    goals = {
        "beyond_cfg_frontier": [
            f"{n}:{k}" for n, k, p in points if beyond_frontier((p["judge_accuracy"], p["fd"]), frontier)
        ],
        "fd_within_10pct_and_judge_plus_15": [
            f"{n}:{k}"
            for n, k, p in points
            if p["fd"] <= 1.1 * base_rec["fd"] and p["judge_accuracy"] >= base_rec["judge_accuracy"] + 0.15
        ],
    }
    doc = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "complete": complete,
        "metric": ev_rec.metric,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "seconds_per_image": per_image,
        "baseline": baseline,
        "runs": runs,
        "goals": goals,
        "seconds": time.perf_counter() - t_start,
    }
    write_text_atomic(out / "nft_gpu.json", json.dumps(doc, indent=1))
    return doc


# ------------------------------------------------------------------ plots
def plot_frontier(doc: dict, path: Path) -> Path:
    """Judge accuracy vs fd: left at the record n (CFG scales, each run's best and final), right at the
    eval n (CFG scales and each run's trajectory over iterations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key in zip(axes, ("record_n", "eval_n"), strict=True):
        cfg = doc["baseline"][key]
        ax.plot([b["fd"] for b in cfg], [b["judge_accuracy"] for b in cfg], "k-o", label="base + CFG")
        for b in cfg:
            ax.annotate(f"w={b['cfg_scale']:g}", (b["fd"], b["judge_accuracy"]), fontsize=8)
        for i, r in enumerate(doc["runs"]):
            color = f"C{i}"  # one colour per run in both panels
            if key == "record_n":
                for kind, marker, ms in (("final_record", "s", 8), ("best_record", "*", 13)):
                    if kind in r:
                        ax.plot(
                            r[kind]["fd"],
                            r[kind]["judge_accuracy"],
                            marker,
                            ms=ms,
                            color=color,
                            mfc="none" if kind == "best_record" else color,
                            label=f"NFT {r['name']} {kind.split('_')[0]}",
                        )
            else:
                ev = r["heldout"]["evaluations"]
                ax.plot(
                    [e["fd"] for e in ev],
                    [e["judge_accuracy"] for e in ev],
                    ".-",
                    color=color,
                    label=f"NFT {r['name']}",
                )
        ax.set_xlabel(f"{doc['metric']} (lower is better), n = {cfg[0]['n']}")
        ax.set_ylabel("judge accuracy (no guidance for NFT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("DiffusionNFT without guidance vs the base model with CFG (same sampler and steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_judge_vs_reward(doc: dict, path: Path) -> Path:
    """Per run: judge and reward-classifier accuracy on the held-out samples over iterations (and the
    reward accuracy of the collected training samples, dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in doc["runs"]:
        ev = r["heldout"]["evaluations"]
        it = [e["iteration"] for e in ev]
        (line,) = ax.plot(it, [e["judge_accuracy"] for e in ev], "-o", ms=3, label=f"{r['name']} judge")
        ax.plot(
            it,
            [e.get("reward_accuracy", math.nan) for e in ev],
            "--",
            color=line.get_color(),
            label=f"{r['name']} reward clf",
        )
        tr = [t for t in r["train"] if "reward_accuracy" in t]
        ax.plot(
            [t["iteration"] for t in tr],
            [t["reward_accuracy"] for t in tr],
            ":",
            color=line.get_color(),
            alpha=0.6,
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy, held-out samples (dotted: reward clf, training samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replot(args) -> tuple[Path, Path]:
    """Draw both plots again from ``<out>/nft_gpu.json``."""
    out = Path(args.out)
    doc = json.loads((out / "nft_gpu.json").read_text())
    return plot_frontier(doc, out / "frontier.png"), plot_judge_vs_reward(doc, out / "judge_vs_reward.png")


# ------------------------------------------------------------------ reference statistics
def reference(args) -> Path:
    """Mean and covariance of the split's features. The feature rows (for KID) are left out: the held-out
    evaluation never computes KID, and without them the file is 0.3 MB instead of 8 MB (192 judge
    features), which keeps it within the device's 64 MiB carry beside the CIFAR-10 training split."""
    from difftools.data import build_dataset
    from difftools.metrics import build_extractor, compute_stats

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    ds = build_dataset(args.data, split=args.split, image_size=args.image_size)
    stats = compute_stats(ds.images, build_extractor(args.features, device=device))
    path = stats.save(args.out, features=False)
    print(json.dumps({"reference": str(path), "n": stats.n, "features": stats.extractor,
                      "bytes": path.stat().st_size}))
    return path


# ------------------------------------------------------------------ command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="CFG baseline + NFT sweep (see the module docstring)")
    r.add_argument(
        "--base", required=True, help="class-conditional flow DiT checkpoint dir (e.g. from train/dit.py)"
    )
    r.add_argument("--reward-clf", required=True, help="reward classifier checkpoint (train-split half 0)")
    r.add_argument(
        "--judge-clf", required=True, help="judge classifier checkpoint (half 1, never trained on)"
    )
    r.add_argument("--reference", required=True, help="reference statistics .npz in the --features space")
    r.add_argument("--features", default=None, help="fd feature space (default: the judge's features)")
    r.add_argument("--out", required=True)
    r.add_argument(
        "--ref-weights", type=lambda s: [float(v) for v in s.split(",")], default=[1e-4, 1e-2, 1e-1]
    )
    r.add_argument("--repeat-weight", type=float, default=1e-2, help="the ref_weight run again with seed 1")
    r.add_argument(
        "--iterations", type=int, default=300, help="upper bound; the time limit usually ends a run"
    )
    r.add_argument("--run-seconds", type=float, default=75.0, help="time limit of one NFT run (at most)")
    r.add_argument("--deadline-minutes", type=float, default=7.5, help="the whole command's budget")
    r.add_argument(
        "--overhead-seconds",
        type=float,
        default=15.0,
        help="per run: setup time outside its time limit (its evaluations outside it are measured)",
    )
    r.add_argument("--eval-every", type=int, default=10, help="iterations between held-out evaluations")
    r.add_argument("--eval-n", type=int, default=2000, help="images per held-out evaluation during the runs")
    r.add_argument("--record-n", type=int, default=10_000, help="images of the final (record) evaluations")
    r.add_argument("--heldout-seed", type=int, default=1_000_000)
    r.add_argument("--batch", type=int, default=1000, help="sampling batch of the evaluations")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        help="a conf/nft.yaml override for every run "
        f"(repeatable; applied after {' '.join(GPU_SET)}), e.g. --set optim.lr=3e-4",
    )
    r.add_argument("--smoke", action="store_true", help="tiny settings on CPU (seconds)")
    r.set_defaults(func=run)
    g = sub.add_parser("plot", help="draw the plots again from <out>/nft_gpu.json")
    g.add_argument("out")
    g.set_defaults(func=replot)
    f = sub.add_parser("reference", help="reference statistics of the real training images")
    f.add_argument("--features", required=True, help="classifier checkpoint dir (or 'inception')")
    f.add_argument("--data", default="cifar10")
    f.add_argument("--split", default="train")
    f.add_argument("--image-size", type=int, default=None)
    f.add_argument("--out", required=True)
    f.add_argument("--cpu", action="store_true")
    f.set_defaults(func=reference)
    args = p.parse_args(argv)
    if getattr(args, "smoke", False):
        for key, value in SMOKE.items():
            setattr(args, key, value if key != "set" else value + args.set)
    return args


def main(argv=None):
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
