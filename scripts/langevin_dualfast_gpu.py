"""Issue 13 on a trained checkpoint: Langevin correctors at equal NFE, and DualFast on / off per solver.

Part ``langevin``: for each NFE budget B (default 8, 12, 20) the same per-image seeds are drawn with

* the plain solver, B steps;
* first-order Langevin (``LangevinCorrector``, 1 NFE per iteration): s = B // 2 + 1 solver steps and one
  iteration after each of the first B - s steps;
* LML (``LMLCorrector``, a preconditioned Langevin step with the div P drift: 2 NFE per iteration):
  s = B - 2k solver steps, k = (B - 1) // 3 iterations after the first k steps;

so every row spends exactly B network evaluations on the solve (plus the final denoising evaluation
that every row makes, see ``difftools.metrics.generate``). Corrector step: ``--step`` (a number or
``auto``, the library's per-step rule; default auto for LML, 0.1 for first-order, as in the library).

Part ``dualfast``: every solver in ``--solvers`` at every NFE in ``--df-nfes`` (default 4, 5, 6, 8, 10, 20)
with DualFast off and on (``dualfast=True``, the library's DualFast defaults).

Scores: ``fd_<features>`` (Fréchet distance in the given feature space, n beside it; not FID unless the
features are Inception) against ``--reference`` (a statistics .npz of ``difftools.metrics.fid.Stats``,
e.g. the train split precomputed where the data lives) and the class accuracy for a classifier feature
space. Per-image seeds ``[--seed, i]``: use a seed other than the ones a schedule or default was chosen
on (held-out). Writes ``langevin_dualfast.json`` and ``langevin_dualfast.md`` to ``--out`` after every row
(``protocol.rows_planned`` says how many are to come), so a run stopped by a time limit keeps what it did.

    python scripts/langevin_dualfast_gpu.py --ckpt <CIFAR-10 flow DiT checkpoint dir> \\
        --features CLASSIFIER_DIR --reference cifar10_train_stats.npz --n 10000 --seed 1 --out $OUT/ld
    python scripts/langevin_dualfast_gpu.py --smoke --out /tmp/ld       # CPU, tiny random DiT, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftools.metrics.evaluate import score  # noqa: E402
from difftools.metrics.features import FeatureExtractor  # noqa: E402
from difftools.metrics.fid import Stats, compute_stats, float_to_uint8  # noqa: E402
from difftools.metrics.generate import SampleSpec, batches, generate  # noqa: E402
from samplers.atomic import write_text_atomic  # noqa: E402
from samplers.langevin import LangevinCorrector, LMLCorrector  # noqa: E402
from samplers.schedules import get_times  # noqa: E402

SCHEDULE, T_START = "logsnr", 1.0


class RandomProjection(FeatureExtractor):
    """Smoke-test features: a fixed random projection of the pixels (not a quality metric)."""

    name, dim = "random_projection", 16

    def extract(self, images):
        flat = images.float().flatten(1) / 255.0
        proj = torch.randn(flat.shape[1], self.dim, generator=torch.Generator().manual_seed(0))
        return flat @ proj.to(flat.device)


def smoke_loaded():
    from difftools.checkpoint import Loaded
    from difftools.models.dit import DiT
    from difftools.process import Flow

    torch.manual_seed(0)
    net = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts at output 0; random weights make every option matter
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return Loaded(net.eval(), Flow(), "flow", None, {}, {"name": "smoke"}, Path("smoke"), 0)


def grid(process, steps: int) -> torch.Tensor:
    t_end = getattr(process, "t_min", 1e-3)
    return get_times(process, SCHEDULE, steps, T_START, float(t_end() if callable(t_end) else t_end))


def first_steps(process, steps: int, k: int) -> tuple[float, float]:
    """t_range that makes a corrector act after the first k of ``steps`` solver steps only."""
    return float(grid(process, steps)[k]), T_START


def langevin_configs(process, solver: str, budget: int, step) -> list[dict]:
    s_first = budget // 2 + 1
    k_lml = (budget - 1) // 3
    s_lml = budget - 2 * k_lml
    first = LangevinCorrector(1, 0.1 if step == "auto" else step,
                              t_range=first_steps(process, s_first, budget - s_first))
    lml = LMLCorrector(1, step, t_range=first_steps(process, s_lml, k_lml))
    return [
        dict(part="langevin", label=f"{solver}", solver=solver, steps=budget, budget=budget, opts={}),
        dict(part="langevin", label=f"{solver} + first-order Langevin ({first.step})", solver=solver,
             steps=s_first, budget=budget, opts=dict(hooks=[first])),
        dict(part="langevin", label=f"{solver} + LML ({lml.step}, lamb {lml.lamb})", solver=solver,
             steps=s_lml, budget=budget, opts=dict(hooks=[lml])),
    ]


def dualfast_configs(solvers, nfes) -> list[dict]:
    return [dict(part="dualfast", label=f"{solver} DualFast {name}", solver=solver, steps=nfe, budget=nfe,
                 dualfast=name, opts=dict(dualfast=value))
            for solver in solvers for nfe in nfes
            for name, value in (("off", False), ("on", True))]


def draw(loaded, spec: SampleSpec, hooks, args, device):
    """:func:`difftools.metrics.generate.generate` over batches, reseeding the correctors' own noise per
    batch (a hook restarts its generator every run, so without this every batch would reuse it)."""
    images, labels, nfe = [], [], 0
    for idx in batches(range(args.n), args.batch):
        for hook in hooks:
            hook.seed = args.seed * 1_000_003 + idx[0]
        x, y, nfe = generate(loaded, idx, spec, device)
        images.append(float_to_uint8(x))
        labels.append(y)
    return torch.cat(images), (None if labels[0] is None else torch.cat(labels)), nfe


def reference_for(args, loaded, extractor) -> Stats:
    if args.reference:
        ref = Stats.load(args.reference)
        if ref.extractor and ref.extractor != extractor.key():
            raise ValueError(f"--reference {args.reference} holds statistics of features {ref.extractor!r}, "
                             f"not of --features ({extractor.key()!r}); compute them with the same extractor")
        return ref
    if args.smoke:  # smoke: statistics of random images (exercises the scoring path only)
        g = torch.Generator().manual_seed(1)
        return compute_stats(torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8), extractor)
    from difftools.metrics.fid import reference_stats

    name, size, root = loaded.reference_dataset()
    return reference_stats(name, extractor, split="train", image_size=size, root=root)


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.ckpt:
        import difftools

        loaded = difftools.load(args.ckpt, use_ema=True, device=device)
    else:
        loaded = smoke_loaded()
    if args.smoke:
        extractor = RandomProjection(device="cpu")
    else:
        from difftools.metrics.features import build_extractor

        extractor = build_extractor(args.features, device=device)
    ref = reference_for(args, loaded, extractor)
    step = args.step if args.step == "auto" else float(args.step)
    configs = []
    if "langevin" in args.parts:
        for budget in args.nfes:
            configs += langevin_configs(loaded.process, args.langevin_solver, budget, step)
    if "dualfast" in args.parts:
        configs += dualfast_configs(args.solvers, args.df_nfes)
    rows, t_all = [], time.time()
    protocol = dict(checkpoint=args.ckpt or "smoke", features=extractor.key(), reference=str(args.reference),
                    reference_n=ref.n, n=args.n, seed=args.seed, schedule=SCHEDULE, precision=args.precision,
                    device=str(device), nfe_note="nfe = network evaluations per image, incl. the final "
                    "denoising evaluation every row makes", seconds=0.0, rows_planned=len(configs),
                    command=" ".join(sys.argv))
    for cfg in configs:
        spec = SampleSpec(sampler=cfg["solver"], steps=cfg["steps"], schedule=SCHEDULE, seed=args.seed,
                          sampler_opts=cfg["opts"], precision=args.precision).validate()
        t0 = time.time()
        images, labels, nfe = draw(loaded, spec, cfg["opts"].get("hooks", []), args, device)
        rec = score(images, labels, extractor, ref, with_kid=False)
        row = {k: v for k, v in cfg.items() if k != "opts"}
        row.update(nfe=nfe, fd=rec[rec["metric"]], metric=rec["metric"], n=rec["n_samples"],
                   class_accuracy=rec["class_accuracy"], seconds=round(time.time() - t0, 2),
                   hooks=[repr(h) for h in cfg["opts"].get("hooks", [])])
        rows.append(row)
        print(json.dumps(row), flush=True)
        protocol["seconds"] = round(time.time() - t_all, 1)
        # after every row, so that a command stopped by its time limit keeps the rows it finished
        write_results(args.out, rows, protocol)
    out = write_results(args.out, rows, protocol)
    print(markdown(rows, protocol))
    return out


def write_results(out_dir: Path, rows: list[dict], protocol: dict) -> dict:
    """``langevin_dualfast.json`` and ``.md`` of the rows so far (atomic: a reader never sees half a file)."""
    out = {"protocol": protocol, "rows": rows}
    write_text_atomic(out_dir / "langevin_dualfast.json", json.dumps(out, indent=1))
    write_text_atomic(out_dir / "langevin_dualfast.md", markdown(rows, protocol))
    return out


def markdown(rows, protocol) -> str:
    def cell(r):
        acc = "" if r["class_accuracy"] is None else f" ({100 * r['class_accuracy']:.1f}%)"
        return f"{r['fd']:.2f}{acc} [{r['nfe']}]"

    metric = rows[0]["metric"] if rows else "fd"
    lines = [f"Command: `{protocol['command']}`", "",
             f"{metric}, n = {protocol['n']} per cell, seed {protocol['seed']}; [NFE per image]; "
             f"{json.dumps(protocol)}", ""]
    for part in ("langevin", "dualfast"):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        budgets = sorted({r["budget"] for r in sel})
        labels = list(dict.fromkeys(r["label"] for r in sel))
        lines += [f"| {part} | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for label in labels:
            by_b = {r["budget"]: r for r in sel if r["label"] == label}
            cells = (cell(by_b[b]) if b in by_b else "" for b in budgets)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint directory (difftools.load); --smoke: default a tiny random DiT")
    p.add_argument("--features", default="inception", help="'inception' or a metric classifier directory")
    p.add_argument("--reference", type=Path, help="reference statistics .npz (default: the checkpoint's "
                   "dataset, train split, computed and cached)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1, help="per-image seed (held out: no choice was tuned on it)")
    p.add_argument("--parts", default="langevin,dualfast")
    p.add_argument("--nfes", default="8,12,20", help="NFE budgets of the Langevin part")
    p.add_argument("--langevin-solver", default="dpmpp_2m")
    p.add_argument("--step", default="auto", help="corrector step delta: a number or 'auto'")
    p.add_argument("--solvers", default="ddim,dpmpp_2m,dpmpp_3m,unipc_bh2")
    p.add_argument("--df-nfes", default="4,5,6,8,10,20", help="NFEs of the DualFast part (4: below 'auto')")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--smoke", action="store_true", help="random-projection features, tiny sizes (CPU)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.precision = min(args.n, 16), min(args.batch, 16), "fp32"
        args.nfes, args.df_nfes, args.solvers = "8", "5", "ddim"
    elif not args.ckpt:
        p.error("--ckpt is required unless --smoke")
    args.parts = args.parts.split(",")
    args.nfes = [int(v) for v in args.nfes.split(",")]
    args.df_nfes = [int(v) for v in args.df_nfes.split(",")]
    args.solvers = args.solvers.split(",")
    return args


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
