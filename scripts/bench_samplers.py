"""Sampler benchmark: error vs NFE on the Gaussian mixture, and solver overhead per step.

    python scripts/bench_samplers.py --smoke --out /tmp/bench          # CPU, < 1 min
    python scripts/bench_samplers.py --out docs/bench_samplers         # CPU, full table (~3 min)
    python scripts/bench_samplers.py --dit --no-accuracy --out out/bench_samplers   # CUDA: overhead ratio

1. Accuracy: RMSE of x(t_end) against the exact probability-flow ODE solution (scipy DOP853) for
   every solver, with and without DualFast, at several step counts, for VP and Flow, with the
   exact mixture denoiser and with two noise-level-dependent model errors that grow toward the
   data end: ``perturbed`` (a random smooth error, scale alpha^2 tanh(Ax+b)) and ``blurred`` (a
   limited-resolution denoiser, the posterior mean at sigma_eff^2 = sigma^2 + (0.05 alpha)^2).
2. Overhead: the cost of ``sample`` per step with a free model (returns a stored tensor) on a
   [256, 4, 32, 32] state — everything but the network: host time (Python + launches) and, on
   CUDA, the solver's own kernel time (profiler); with ``--dit`` also one DiT-S/2 forward at batch
   256 (bf16 autocast, eager and compiled) and the ratios (target < 1%). ``--no-accuracy`` skips 1.
Writes ``bench_samplers.json`` and ``bench_samplers.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.mixture, the Gaussian-mixture harness

from difftools.benchmark.profiling import kernel_ms  # noqa: E402
from difftools.models.dit import dit_from_preset  # noqa: E402
from difftools.process import VP, Flow, as_time  # noqa: E402
from samplers import ModelFn, sample  # noqa: E402
from samplers.sampling import SOLVERS  # noqa: E402
from tests.mixture import make_mixture  # noqa: E402

MODELS = ("exact", "perturbed", "blurred")


def blurred_model_fn(mix, process, blur: float = 0.05) -> ModelFn:
    """A limited-resolution denoiser: the mixture's posterior mean computed as if the noise were
    sigma_eff^2 = sigma^2 + (blur alpha)^2 (a fixed data-space blur). Its error vanishes at high
    noise and grows toward t -> 0, the kind of model error DualFast (arXiv 2506.13058) targets."""

    def net(x_t, t, y=None):
        t64 = as_time(t).to(torch.float64)
        alpha, sigma = process.alpha(t64), process.sigma(t64)
        return mix.posterior_mean(x_t, alpha, torch.sqrt(sigma**2 + (blur * alpha) ** 2), y=y).to(x_t.dtype)

    return ModelFn(net, process, prediction="x0")


def accuracy(solvers, steps_list, processes, n, dim, perturb_scale):
    rows = []
    mix = make_mixture(dim=dim, num_components=4, std=0.3, radius=1.5)
    for pname, process in processes:
        x_T = torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ref = mix.ode_reference(process, x_T, 1.0, 1e-3, rtol=1e-10, atol=1e-10)
        for model in MODELS:
            if model == "blurred":
                mf = blurred_model_fn(mix, process)
            else:
                pert = None if model == "exact" else dict(scale=perturb_scale, power=2.0)
                mf = mix.model_fn(process, perturbation=pert)
            for solver in solvers:
                for steps in steps_list:
                    for df in (False, True):
                        mf.reset()
                        x = sample(mf, x_T, solver, steps=steps, dualfast=df)
                        rmse = ((x - ref) ** 2).mean().sqrt().item()
                        rows.append(
                            dict(
                                process=pname,
                                model=model,
                                solver=solver,
                                steps=steps,
                                nfe=mf.nfe,
                                dualfast=df,
                                rmse=rmse,
                            )
                        )
    return rows


def overhead(solvers, device, batch, steps, repeats):
    """Per-step cost of ``sample`` with a free model (returns a stored tensor), so everything but
    the network: {solver: {"host_ms": wall time per step, "device_ms": GPU kernel time per step}}.

    ``host_ms`` is Python + launch time; on CUDA it runs ahead of the GPU while a real network
    computes, so what the solver adds to a sampling run is its kernels' time, ``device_ms``
    (summed from the profiler's CUDA kernel records)."""
    x = torch.randn(batch, 4, 32, 32, device=device)
    out = torch.randn_like(x)
    mf = ModelFn(lambda x_t, t: out, VP(), "eps")
    res = {}
    for solver in solvers:
        times = []
        for _ in range(repeats):
            mf.reset()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sample(mf, x, solver, steps=steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = dict(host_ms=min(times) / steps * 1e3, device_ms=None)
        if device.type == "cuda":
            row["device_ms"] = kernel_ms(lambda s=solver: sample(mf, x, s, steps=steps)) / steps
        res[solver] = row
    return res


def dit_forward_ms(batch, repeats=20, compiled=False):
    """Wall time of one DiT-S/2 forward (bf16 autocast, 32x32x4, batch ``batch``) on CUDA."""
    model = dit_from_preset("DiT-S/2", input_size=32, in_channels=4, num_classes=10).cuda().eval()
    fn = torch.compile(model) if compiled else model
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    t = torch.rand(batch, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            fn(x, t, y)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x, t, y)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def to_markdown(acc, over, dit_ms, args) -> str:
    lines = [f"Command: `python scripts/bench_samplers.py {' '.join(sys.argv[1:])}`", ""]
    steps_list = sorted({r["steps"] for r in acc})
    for pname in sorted({r["process"] for r in acc}):
        for model in MODELS:
            lines += [
                f"### RMSE vs exact ODE solution — {pname}, {model} denoiser (off / DualFast)",
                "",
                "| solver | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
                "|---|" + "---|" * len(steps_list),
            ]
            for solver in dict.fromkeys(r["solver"] for r in acc):
                cells = []
                for s in steps_list:
                    sel = {
                        r["dualfast"]: r
                        for r in acc
                        if r["process"] == pname
                        and r["model"] == model
                        and r["solver"] == solver
                        and r["steps"] == s
                    }
                    cells.append(
                        f"{sel[False]['rmse']:.4f} / {sel[True]['rmse']:.4f} (NFE {sel[False]['nfe']})"
                    )
                lines.append(f"| {solver} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        f"### Solver overhead per step (model excluded), batch {args.batch} x 4 x 32 x 32 on {args.device}",
        "",
        "host = Python + kernel launches per step with a free model (overlaps a real network's GPU time);",
        "device = the solver's own CUDA kernel time per step (what it adds to a sampling run).",
        "",
    ]
    fwd = {k: v for k, v in (dit_ms or {}).items() if v}
    head = "| solver | host ms / step | device ms / step |"
    head += "".join(f" device % of DiT-S/2 fwd ({k}) | host % ({k}) |" for k in fwd)
    lines += [head, "|---|" + "---:|" * (2 + 2 * len(fwd))]
    for solver, r in over.items():
        dev = r["device_ms"]
        cells = [f"{r['host_ms']:.4f}", "–" if dev is None else f"{dev:.4f}"]
        for ms in fwd.values():
            cells += ["–" if dev is None else f"{100 * dev / ms:.3f}%", f"{100 * r['host_ms'] / ms:.2f}%"]
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    if fwd:
        lines += ["", "DiT-S/2 forward, batch " + str(args.batch) + ", bf16: "
                  + ", ".join(f"{k} {ms:.3f} ms" for k, ms in fwd.items())]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (< 1 min)")
    ap.add_argument("--dit", action="store_true", help="CUDA: time a DiT-S/2 forward and report the ratio")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--no-accuracy", action="store_true",
                    help="skip the mixture accuracy table (CPU work): overhead only")
    ap.add_argument("--solvers", default=None, help="comma-separated subset of solvers (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    device = torch.device(args.device)
    solvers = list(SOLVERS) if args.solvers is None else args.solvers.split(",")
    if args.smoke:
        acc = accuracy(
            ["ddim", "dpmpp_2m", "unipc_bh2"], [4, 8], [("vp", VP())], n=32, dim=4, perturb_scale=0.15
        )
        args.batch = min(args.batch, 16) if device.type == "cpu" else args.batch
        over = overhead(["ddim", "dpmpp_3m", "unipc_bh2"], device, args.batch, steps=10, repeats=2)
    else:
        acc = [] if args.no_accuracy else accuracy(
            solvers, [4, 5, 6, 8, 10, 20], [("vp", VP()), ("flow", Flow())], n=256, dim=8, perturb_scale=0.15
        )
        over = overhead(solvers, device, args.batch, steps=20, repeats=5)
    dit_ms = None
    if args.dit and device.type == "cuda":
        dit_ms = dict(eager=dit_forward_ms(args.batch))
        try:  # the compiled forward is the stricter denominator (shorter)
            dit_ms["compiled"] = dit_forward_ms(args.batch, compiled=True)
        except Exception as exc:  # noqa: BLE001 - report, keep the eager ratio
            print(f"torch.compile of DiT-S/2 failed ({type(exc).__name__}: {exc}); eager ratio only")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_samplers.json").write_text(
        json.dumps(
            dict(
                accuracy=acc,
                overhead_ms_per_step=over,
                dit_s2_forward_ms=dit_ms,  # {eager, compiled}
                batch=args.batch,
                device=str(device),
                command=" ".join(sys.argv),
            ),
            indent=1,
        )
    )
    md = to_markdown(acc, over, dit_ms, args)
    (args.out / "bench_samplers.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
