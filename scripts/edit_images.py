#!/usr/bin/env python
"""Apply learned CASO embeddings to held-out images; write metrics (JSON) and a before/after grid (PNG).

For every learned embedding e_a (attribute value a) the sources are the held-out images that the
attribute classifier does NOT already put in class a (optionally only some dataset classes). Each is
inverted with the probability-flow ODE under the null class (CASO's empty prompt, guidance 1) up to
t_edit and denoised under CFG with e_a (uncond = null) at scale w, on the same grid
(:func:`difftools.editing.inversion.edit`). Reported per (embedding, w, t_edit), each with n:

* ``success``: fraction classified as a by the training classifier (the one the embedding was
  optimised against), ``success_eval``: the same by an independent classifier (``--eval-classifier``);
* ``rmse``: per-image pixel RMSE between edit and source (images in [-1, 1]), averaged;
* ``label_kept``: fraction whose dataset class (cached metric classifier) still equals the source's
  true label (disentanglement; meaningless when the attribute IS the class);
* ``ink_mass_change``: mean change of the mean pixel intensity in [0, 1] (what "thickness" measures).

Rows ``null`` (reconstruction: the identity edit) and, when the attribute is the dataset class, ``label``
(the DiT's own label embedding of a, the model's built-in way to ask for a) are references.

    python scripts/edit_images.py --embeddings runs/edit/<run>/embeddings.safetensors \\
        --eval-classifier runs/classifier/<other> --guidance 10 5 --t-edit 1.0 0.7 --grid docs/img/edit.png

``--reconstruction --base <DiT run>`` instead measures how well ODE inversion + regeneration returns
the input (pixel RMSE per solver and step count, null class vs the true labels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difftools.data import build_dataset
from difftools.editing.attributes import images_and_labels, ink_mass
from difftools.editing.caso import EmbeddingDiT, guided_model_fn
from difftools.editing.embeddings import load_embeddings
from difftools.editing.inversion import edit, invert, regenerate
from difftools.editing.resources import load_attribute_classifier, load_base
from difftools.training.grid import save_grid
from samplers import ModelFn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embeddings", default=None, help="embeddings.safetensors written by train/edit.py")
    p.add_argument("--base", default=None, help="DiT run / checkpoint (default: the one in --embeddings)")
    p.add_argument("--classifier", default=None, help="attribute classifier (default: the recorded one)")
    p.add_argument("--eval-classifier", default=None, help="an independent classifier with the same classes")
    p.add_argument("--names", nargs="*", default=None, help="embeddings to apply (default: all)")
    p.add_argument("--split", default="test")
    p.add_argument("--source-classes", type=int, nargs="*", default=None, help="only these dataset classes")
    p.add_argument("--limit", type=int, default=None, help="at most this many sources per embedding")
    p.add_argument("--guidance", type=float, nargs="+", default=[10.0], help="CFG scales w")
    p.add_argument("--t-edit", type=float, nargs="+", default=[1.0], help="inversion depths (1 = full)")
    p.add_argument("--solver", default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--schedule", default="uniform_t")
    p.add_argument("--grid", default=None, help="PNG: per embedding a source row, then one row per setting")
    p.add_argument("--grid-cols", type=int, default=12)
    p.add_argument("--grid-scale", type=int, default=1, help="upscale factor of the grid images (nearest)")
    p.add_argument("--json", default=None, help="where to write the metrics (default: next to --embeddings)")
    p.add_argument("--no-references", action="store_true", help="skip the null / label reference rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reconstruction", action="store_true",
                   help="only measure invert + regenerate RMSE (needs --base; see --solvers, --steps-list)")
    p.add_argument("--solvers", nargs="+", default=["ddim", "dpmpp_2m", "heun"])
    p.add_argument("--steps-list", type=int, nargs="+", default=[10, 25, 50])
    args = p.parse_args(argv)
    if args.embeddings is None and not args.reconstruction:
        p.error("--embeddings is required (unless --reconstruction)")
    if args.reconstruction and args.base is None:
        p.error("--reconstruction needs --base")
    return args


def reconstruction(args) -> dict:
    """Pixel RMSE of regenerate(invert(x)) vs x on ``--limit`` images (default 64) of ``--split``, for every
    solver and step count, with the null class and with the images' own labels as the conditioning."""
    base = load_base(args.base)
    mf = ModelFn(EmbeddingDiT(base.model), base.process, base.prediction)
    info = base.dataset_info
    ds = build_dataset(info["name"], split=args.split, image_size=int(info["image_size"]))
    x, y = images_and_labels(ds, args.source_classes, args.limit or 64)
    rows = []
    for cond_name, cond in (("null", {}), ("label", {"y": y})):
        for solver in args.solvers:
            for n in args.steps_list:
                t0 = time.perf_counter()
                x_T = invert(mf, x, solver=solver, steps=n, schedule=args.schedule, **cond)
                rec = regenerate(mf, x_T, solver=solver, steps=n, schedule=args.schedule, **cond)
                rows.append({"conditioning": cond_name, "solver": solver, "steps": n, "n": len(x),
                             "rmse": (rec - x).pow(2).flatten(1).mean(1).sqrt().mean().item(),
                             "x_T_std": x_T.std().item(), "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]))
    result = {"base": str(base.path), "split": args.split, "schedule": args.schedule, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def predict(classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([classifier(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.reconstruction:
        return reconstruction(args)
    emb_path = Path(args.embeddings)
    emb, meta = load_embeddings(emb_path)
    base = load_base(args.base or meta.get("base"))
    net = EmbeddingDiT(base.model)
    if emb.dim != net.hidden_size:
        raise ValueError(f"{emb_path} holds {emb.dim}-dimensional embeddings; the base DiT {base.path} "
                         f"conditions on {net.hidden_size} dimensions")
    info = base.dataset_info
    clf_path = args.classifier or (meta.get("classifier") or {}).get("path")
    classifier, clf_meta = load_attribute_classifier(clf_path, info)
    evaluator = load_attribute_classifier(args.eval_classifier, info)[0] if args.eval_classifier else None
    digit_clf = load_attribute_classifier(None, info)[0]  # the dataset-class metric classifier
    ds = build_dataset(info["name"], split=args.split, image_size=int(info["image_size"]))
    images, labels = images_and_labels(ds, args.source_classes)
    attribute_is_class = clf_meta["class_names"] == list(info.get("class_names") or [])
    pred_attr = predict(classifier, images)

    mf = ModelFn(net, base.process, base.prediction)
    null = net.null_embedding()
    names = args.names or emb.names
    rows, grid_rows, skipped, t0 = [], [], [], time.perf_counter()
    for name in names:
        k = emb.index(name)
        target = emb.targets[k]
        keep = pred_attr != target
        xs, ys = images[keep][: args.limit], labels[keep][: args.limit]
        if len(xs) == 0:
            print(f"skipped {name!r}: every {args.split} image already reads as class {target}")
            skipped.append(name)
            continue
        grid_rows.append(xs[: args.grid_cols])
        runs = [("caso", emb.weight.detach()[k], w, t_edit) for w in args.guidance for t_edit in args.t_edit]
        if not args.no_references:
            # the null row is the plain reconstruction (guidance 1 whatever w): one per depth
            runs += [("null", null, 1.0, t_edit) for t_edit in args.t_edit]
            if attribute_is_class:
                label = net.label_embedding(torch.tensor(target)).detach()
                runs += [("label", label, w, t_edit) for w in args.guidance for t_edit in args.t_edit]
        for kind, vec, w, t_edit in runs:
            g = guided_model_fn(net, base.process, base.prediction, w, null)
            out, _ = edit(mf, g, xs, invert_cond={}, edit_cond={"y_embed": vec.expand(len(xs), -1)},
                          solver=args.solver, steps=args.steps, schedule=args.schedule, t_edit=t_edit)
            out = out.clamp(-1, 1)
            row = {
                "embedding": name, "target_class": target, "kind": kind, "guidance": w,
                "t_edit": t_edit, "n": len(xs),
                "success": (predict(classifier, out) == target).float().mean().item(),
                "rmse": (out - xs).pow(2).flatten(1).mean(1).sqrt().mean().item(),
                "label_kept": (predict(digit_clf, out) == ys).float().mean().item(),
                "ink_mass_change": (ink_mass(out) - ink_mass(xs)).mean().item(),
            }
            if evaluator is not None:
                row["success_eval"] = (predict(evaluator, out) == target).float().mean().item()
            rows.append(row)
            print(json.dumps({k2: round(v, 4) if isinstance(v, float) else v for k2, v in row.items()}))
            if kind == "caso":
                grid_rows.append(out[: args.grid_cols])
    result = {
        "embeddings": str(emb_path), "base": str(base.path), "classifier": clf_meta["path"],
        "eval_classifier": args.eval_classifier, "split": args.split, "solver": args.solver,
        "steps": args.steps, "schedule": args.schedule, "invert_with": "null class, w = 1",
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "skipped": skipped,
    }
    out_json = Path(args.json) if args.json else emb_path.with_name("edit_metrics.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    if args.grid and grid_rows:
        cols = args.grid_cols
        padded = [torch.cat([r, torch.ones(cols - len(r), *r.shape[1:])]) if len(r) < cols else r
                  for r in grid_rows]
        grid = torch.cat(padded)
        if args.grid_scale > 1:  # nearest-neighbour: keeps the pixels of tiny images visible in docs
            grid = torch.nn.functional.interpolate(grid, scale_factor=args.grid_scale, mode="nearest")
        save_grid(grid, args.grid, nrow=cols)
        print(f"grid: {args.grid} (per embedding: sources, then one row per (w, t_edit) in the order given)")
    return result


if __name__ == "__main__":
    main()
