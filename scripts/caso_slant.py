#!/usr/bin/env python
"""CASO against two baselines on MNIST digit slant (issue 17; protocol and decision rule in docs/editing.md).

    python scripts/caso_slant.py --base runs/dit/mnist32_base --out runs/caso_slant

Every stage keeps its result in --out and is skipped when it is there (delete the file to redo it):

1. the slant splits (half A / half B of MNIST train, test; :func:`difftools.editing.attributes.slant_splits`),
   the attribute classifier on half A (accuracy on half B) -> ``slant_classifier/``;
2. the CASO arms (slot x timestep x lambda_rec) trained against it on half-A images -> ``arms/<arm>/``
   (train/edit.py's engine runs, resumable);
3. the baselines (mean-difference rows; the classifier-guidance step unit, calibrated on the
   selection set) and the edit sweep on the selection set S (half B) and the report set R (test)
   -> ``sweep_S.json``, ``sweep_R.json``;
4. selection on S, the decision on R, frontier plots and example grids -> ``results.json``, --plot, --grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ARMS = {  # name -> CasoConfig fields
    "caso_vector_uniform_rec0": dict(slot="vector", timestep="uniform", lambda_rec=0.0),
    "caso_vector_uniform_rec1": dict(slot="vector", timestep="uniform", lambda_rec=1.0),
    "caso_vector_released_rec0": dict(slot="vector", timestep="released", lambda_rec=0.0),
    "caso_vector_released_rec1": dict(slot="vector", timestep="released", lambda_rec=1.0),
    "caso_labelrow_uniform_rec0": dict(slot="label_row", timestep="uniform", lambda_rec=0.0),
    "caso_labelrow_uniform_rec1": dict(slot="label_row", timestep="uniform", lambda_rec=1.0),
}
BASELINES = ("mean_difference", "classifier_guidance")
#: the decision rule's operating points (docs/editing.md): name -> (min class kept, min SSIM)
OPERATING_POINTS = {"P1": (0.90, 0.50), "P2": (0.95, 0.70)}
#: added after the run (the pre-registered points left every method near zero success): reported
#: separately, labelled post hoc, with the same selection-on-S / report-on-R procedure
POST_HOC_POINTS = {"P0_post_hoc": (0.50, 0.50)}
NAMES, TARGETS = ["left", "right"], [0, 1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True,
                   help="class-conditional MNIST 32px DiT run (train/dit.py data=mnist)")
    p.add_argument("--out", default="runs/caso_slant")
    p.add_argument("--n-select", type=int, default=16, help="sources per direction in the selection set S")
    p.add_argument("--n-report", type=int, default=32, help="sources per direction in the report set R")
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0, 10.0])
    p.add_argument("--depths", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of inversion and of regeneration")
    p.add_argument("--caso-steps", type=int, default=150)
    p.add_argument("--caso-batch", type=int, default=16)
    p.add_argument("--train-images", type=int, default=5000, help="half-A images CASO trains on")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--cg-unit-pixels", type=float, default=0.02,
                   help="classifier guidance: s = w * unit, unit = this / median RMS of grad log p on S")
    p.add_argument("--clf-epochs", type=int, default=3, help="epochs of the slant classifier on half A")
    p.add_argument("--metric-classifier", default=None,
                   help="10-class MNIST classifier for 'kept' (default: the cached metric classifier)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default="docs/img/caso_slant_frontier.png")
    p.add_argument("--grid", default="docs/img/caso_slant_edits.png")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def predict(clf, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([clf(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])


def unit_images(ds) -> torch.Tensor:
    return ds.images.float() / 127.5 - 1 if ds.images.dtype == torch.uint8 else ds.images.float() * 2 - 1


def attribute_classifier(out: Path, splits, epochs: int) -> tuple[torch.nn.Module, dict]:
    from difftools.metrics.classifier import fit_classifier, save_classifier
    from difftools.metrics.features import load_classifier
    from difftools.models.classifier import Classifier

    path = out / "slant_classifier"
    if not (path / "config.yaml").is_file():
        torch.manual_seed(0)
        model = Classifier(1, 32, 2, widths=(16, 32, 64), depth=1, name="clf_mnist32_slant")
        res = fit_classifier(model, splits["train"], splits["heldout"], epochs=epochs, batch_size=256, lr=0.1,
                             flip=False, shift=2, seed=0, device="cpu", log=log)
        save_classifier(path, model, splits["train"].info, res,
                        config={"data": "mnist 32px slant, half A (difftools.editing.attributes)",
                                "evaluated_on": "half B"})
    clf, meta = load_classifier(path)
    log(f"slant classifier {path}: accuracy on half B {meta['test_accuracy']:.4f}")
    return clf, meta


def train_arms(args, out: Path, base, clf, train_images) -> dict:
    from difftools.editing.embeddings import load_embeddings, save_embeddings
    from difftools.editing.optimize import CasoConfig, train_embeddings

    arms = {}
    for name in args.arms:
        cfg = CasoConfig(**ARMS[name], max_steps=args.caso_steps, batch_size=args.caso_batch, log_every=50,
                         ckpt_every=100)
        run = out / "arms" / name
        done = run / "embeddings.safetensors"
        t0 = time.perf_counter()
        if done.is_file():
            emb, meta = load_embeddings(done)
            seconds = meta.get("train_seconds")
        else:
            res = train_embeddings(base.model, base.process, base.prediction, clf, train_images, NAMES,
                                   TARGETS, cfg, out_dir=run, meta={"base": str(base.path)},
                                   cpu_threads=args.threads)
            emb, seconds = res.embeddings, round(time.perf_counter() - t0, 1)
            last = res.history[-10:]
            log(f"{name}: {res.step} steps in {seconds} s; last 10 steps p_target "
                f"{sum(h['p_target'] for h in last) / len(last):.3f}")
            save_embeddings(done, emb,
                            {"base": str(base.path), "train_seconds": seconds, "config": ARMS[name]})
        arms[name] = {"vectors": emb.vectors().detach(), "train_seconds": seconds}
    return arms


def sources(ds, n: int, low: torch.Tensor, high: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per target a: the first n images clearly on the other side, beyond their class's quartile
    (``low`` / ``high``: per-class 25th / 75th slant percentiles of half A): toward "right" the
    images below the lower quartile, toward "left" those above the upper one. An edit must move
    them past the class median, not just across it from next to it."""
    from difftools.editing.attributes import slant

    x, classes = unit_images(ds), ds.source_labels
    s = slant(x)
    below, above = s < low[classes], s > high[classes]
    return {0: (x[above][:n], classes[above][:n]), 1: (x[below][:n], classes[below][:n])}


def darker_half(images: torch.Tensor) -> torch.Tensor:
    """Mean intensity in [0, 1] of the darker half of each image's pixels ([N]): ~0 for MNIST digits."""
    flat = ((images + 1) / 2).flatten(1).sort(dim=1).values
    return flat[:, : flat.shape[1] // 2].mean(1)


def aggregate(rows: list[dict]) -> list[dict]:
    """n-weighted means over the two directions per (method, w, t_edit)."""
    keys = ("success", "kept", "ssim", "dslant", "clf_success", "success_ink50", "background")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["w"], r["t_edit"]), []).append(r)
    out = []
    for (method, w, t_edit), rs in groups.items():
        n = sum(r["n"] for r in rs)
        out.append({"method": method, "w": w, "t_edit": t_edit, "n": n,
                    **{k: sum(r[k] * r["n"] for r in rs) / n for k in keys},
                    "seconds": sum(r["seconds"] for r in rs)})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from difftools.editing.attributes import class_medians, slant, slant_judge, slant_splits
    from difftools.editing.baselines import (
        ClassifierGuidedFn,
        mean_difference_direction,
        mean_difference_embeddings,
    )
    from difftools.editing.caso import EmbeddingDiT
    from difftools.editing.measures import ssim
    from difftools.editing.resources import load_attribute_classifier, load_base
    from difftools.editing.sweep import edit_sweep, embedding_method, guidance_method, select
    from samplers import ModelFn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = load_base(args.base)
    info = base.dataset_info
    if (info["name"], int(info["image_size"])) != ("mnist", 32):
        raise ValueError(f"{base.path} models {info['name']} at {info['image_size']}px; this experiment "
                         "needs an MNIST 32px DiT (python train/dit.py data=mnist ...)")
    splits = slant_splits("mnist", image_size=32)
    medians = splits["train"].medians
    attr_clf, attr_meta = attribute_classifier(out, splits, args.clf_epochs)
    digit_clf, digit_meta = load_attribute_classifier(args.metric_classifier, info)  # default: the cached one
    net = EmbeddingDiT(base.model)
    mf = ModelFn(net, base.process, base.prediction)

    # ---------------------------------------------------------------- CASO arms
    gen = torch.Generator().manual_seed(0)
    a_images = unit_images(splits["train"])
    train_images = a_images[torch.randperm(len(a_images), generator=gen)[: args.train_images]]
    t0 = time.perf_counter()
    arms = train_arms(args, out, base, attr_clf, train_images)
    log(f"CASO arms ready ({time.perf_counter() - t0:.0f} s)")

    # ---------------------------------------------------------------- baselines
    a_classes = splits["train"].source_labels
    a_slant = slant(a_images)
    medians50 = class_medians(slant(a_images, threshold=0.5), a_classes, 10)
    global_right = a_slant > a_slant.median()
    md_rows, md_dir = mean_difference_embeddings(net, a_classes, global_right, NAMES, TARGETS)
    # with the attribute's own (per-class median) labels the direction is zero up to class-size parity
    balanced = mean_difference_direction(net.label_embedding(a_classes).detach(),
                                         splits["train"].labels.bool())
    vectors = {name: {a: arm["vectors"][a] for a in TARGETS} for name, arm in arms.items()}
    vectors["mean_difference"] = {a: md_rows.weight.detach()[a] for a in TARGETS}
    low = torch.stack([a_slant[a_classes == k].quantile(0.25) for k in range(10)])
    high = torch.stack([a_slant[a_classes == k].quantile(0.75) for k in range(10)])
    sel_sources = sources(splits["heldout"], args.n_select, low, high)
    rep_sources = sources(splits["test"], args.n_report, low, high)
    rms = []
    for a, (x, _) in sel_sources.items():
        g = ClassifierGuidedFn(mf, attr_clf, a, 1.0).log_prob_grad(x)
        rms.append(g.pow(2).flatten(1).mean(1).sqrt())
    cg_unit = args.cg_unit_pixels / float(torch.cat(rms).median())
    methods = {name: embedding_method(net, base.process, base.prediction, v) for name, v in vectors.items()}
    methods["classifier_guidance"] = guidance_method(mf, attr_clf, cg_unit)
    reference = {"reconstruction": embedding_method(net, base.process, base.prediction,
                                                     {a: net.null_embedding() for a in TARGETS})}

    def measure(edited, x, y, target):
        sign = 1.0 if target == 1 else -1.0
        judged50 = slant_judge(edited, y, medians50, threshold=0.5)
        return {"success": (slant_judge(edited, y, medians) == target).float().mean().item(),
                "kept": (predict(digit_clf, edited) == y).float().mean().item(),
                "ssim": ssim(edited, x).mean().item(),
                "dslant": sign * (slant(edited) - slant(x)).mean().item(),
                "clf_success": (predict(attr_clf, edited) == target).float().mean().item(),
                # robustness of the judge (added after the first run showed hazy backgrounds): the same
                # judge on the pixels brighter than 1/2 (medians of that measure on half A), and the
                # background level (mean of the darker half of the pixels, in [0, 1])
                "success_ink50": (judged50 == target).float().mean().item(),
                "background": darker_half(edited).mean().item()}

    sweeps = {}
    for set_name, src in (("S", sel_sources), ("R", rep_sources)):
        path = out / f"sweep_{set_name}.json"
        if path.is_file():
            sweeps[set_name] = json.loads(path.read_text())
            continue
        log(f"sweep on {set_name}: {sum(len(x) for x, _ in src.values())} sources")
        rows = edit_sweep(mf, src, methods, args.scales, args.depths, measure, steps=args.steps, log=log)
        rows += edit_sweep(mf, src, reference, [1.0], args.depths, measure, steps=args.steps, log=log)
        path.write_text(json.dumps(rows, indent=1))
        sweeps[set_name] = rows

    # ---------------------------------------------------------------- selection on S, report on R
    agg = {k: aggregate(rows) for k, rows in sweeps.items()}
    caso_names = [n for n in arms]

    def settings(set_name, method):
        return [r for r in agg[set_name] if r["method"] == method]

    def at(set_name, method, w, t_edit):
        return next(r for r in agg[set_name] if (r["method"], r["w"], r["t_edit"]) == (method, w, t_edit))

    decision = {}
    for point, (min_kept, min_ssim) in {**OPERATING_POINTS, **POST_HOC_POINTS}.items():
        chosen = {m: select(settings("S", m), min_kept, min_ssim) for m in [*caso_names, *BASELINES]}
        best_caso = max((m for m in caso_names if chosen[m] is not None),
                        key=lambda m: (chosen[m]["success"], chosen[m]["ssim"]), default=None)
        report = {m: (at("R", m, c["w"], c["t_edit"]) if c is not None else None) for m, c in chosen.items()}
        verdict = {}
        if best_caso is not None:
            c = report[best_caso]
            for b in BASELINES:
                r = report[b]
                if r is None:
                    verdict[b] = "baseline has no setting meeting the constraint on S"
                    continue
                se = (c["success"] * (1 - c["success"]) / c["n"]
                      + r["success"] * (1 - r["success"]) / r["n"]) ** 0.5
                diff = c["success"] - r["success"]
                verdict[b] = {"diff": diff, "se": se,
                              "result": "beyond" if diff > 2 * se else ("at" if diff >= -2 * se else "below")}
        decision[point] = {"min_kept": min_kept, "min_ssim": min_ssim, "chosen_on_S": chosen,
                           "best_caso_arm": best_caso, "report_on_R": report, "caso_vs_baselines": verdict}
    results = {
        "base": str(base.path), "attribute_classifier": attr_meta["path"],
        "attribute_classifier_accuracy_half_b": attr_meta["test_accuracy"],
        "metric_classifier": digit_meta["path"], "medians": medians.tolist(),
        "mean_difference": {"labels": "slant above the global median of half A",
                            "norm": float(md_dir.norm()), "norm_per_class_labels": float(balanced.norm())},
        "classifier_guidance_unit": cg_unit, "arms": {k: {"train_seconds": v["train_seconds"], **ARMS[k]}
                                                       for k, v in arms.items()},
        "n_select_per_direction": args.n_select, "n_report_per_direction": args.n_report,
        "steps": args.steps, "aggregate": agg, "decision": decision,
        "seconds_total_this_call": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.plot:
        plot_frontiers(agg["R"], args.plot)
    if args.grid:
        example_grid(args, decision["P1"], methods, mf, rep_sources, args.grid)
        for point in POST_HOC_POINTS:
            example_grid(args, decision[point], methods, mf, rep_sources,
                         str(Path(args.grid).with_name(f"{Path(args.grid).stem}_{point}.png")))
    print(json.dumps({p: {"best_caso_arm": d["best_caso_arm"], "vs": d["caso_vs_baselines"]}
                      for p, d in decision.items()}, default=str))
    return results


def plot_frontiers(rows: list[dict], path: str) -> None:
    """Success vs SSIM and vs class kept on R: every setting of every method, its Pareto front as a
    line; top row the pre-registered judge, bottom row the judge on pixels brighter than 1/2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftools.editing.sweep import pareto_front

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "reconstruction"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 10))
    judges = (("success", "slant judge"), ("success_ink50", "slant judge, pixels > 1/2"))
    preservation = (("ssim", "SSIM to the source"), ("kept", "source class kept"))
    panels = [(axes[i, j], key, label, succ, judge) for i, (succ, judge) in enumerate(judges)
              for j, (key, label) in enumerate(preservation)]
    for ax, key, label, succ, judge in panels:
        for i, m in enumerate(methods):
            pts = [(r[key], r[succ]) for r in rows if r["method"] == m]
            color = f"C{i}"
            ax.scatter(*zip(*pts, strict=True), color=color, s=14, alpha=0.5)
            front = [pts[j] for j in pareto_front(pts)]
            ax.plot(*zip(*front, strict=True), color=color, marker="o", ms=4, label=m,
                    ls="-" if m.startswith("caso") else "--")
        for r in rows:
            if r["method"] == "reconstruction":
                ax.scatter([r[key]], [r[succ]], color="k", marker="x")
        ax.set_xlabel(label + "  (x: inversion + regeneration, no edit)")
        ax.set_ylabel(f"success ({judge})")
        ax.set_ylim(-0.03, 0.6)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("MNIST slant edits, report set (n = 64 per setting): every (w, t_edit) per method, "
                 "Pareto front joined")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    log(f"frontier plot: {path}")


@torch.no_grad()
def example_grid(args, point: dict, methods, mf, rep_sources, path: str, cols: int = 8) -> None:
    """Per target: a row of R sources, then one row per method at its P1 setting chosen on S."""
    from difftools.editing.inversion import inversion_grid, invert, regenerate
    from difftools.training.grid import save_grid

    rows = []
    for a, (x, _) in rep_sources.items():
        x = x[:cols]
        rows.append(x)
        for m, chosen in point["chosen_on_S"].items():
            if chosen is None:
                rows.append(torch.ones_like(x))
                continue
            grid = inversion_grid(mf, args.steps, "uniform_t", chosen["t_edit"], 1e-3)
            fn, cond = methods[m](chosen["w"], a)
            cond = {k: v.expand(len(x), -1) for k, v in cond.items()}
            rows.append(regenerate(fn, invert(mf, x, times=grid), times=grid, **cond).clamp(-1, 1))
    rows = [torch.cat([r, torch.ones(cols - len(r), *r.shape[1:])]) for r in rows]  # white padding
    grid = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=2, mode="nearest")
    save_grid(grid, path, nrow=cols)
    log(f"example grid: {path} (per direction: sources, then {list(point['chosen_on_S'])})")


if __name__ == "__main__":
    main()
