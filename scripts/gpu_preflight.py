"""Check at the start of a device call that what the call needs is there, before it spends minutes.

    python3 scripts/gpu_preflight.py --cuda --scripts scripts/search_gpu.py \\
        --paths .gpu/models/cifar10_dit_t2_flow/ema.safetensors .gpu/ref/cifar10_32px

* every ``--scripts`` file is imported as a module (its top-level imports run; its ``main`` does not),
  and so are the packages the project imports only inside functions (Hydra, OmegaConf, clean-fid,
  matplotlib, TensorBoard, ...): a missing one is named with what supplies it;
* every ``--paths`` entry exists (the call's carry arrived where the command reads it);
* ``--cuda``: a CUDA device is visible;
* ``.gpu/setup.sh``, when there, is ``scripts/gpu_setup.sh`` as committed (a stale copy lacks what the
  runbook's commands use, e.g. ``left``).

Prints one line per check (torch version and the device first) and exits 1 listing every problem, 0
when there is none. Costs a few seconds (the imports); docs/gpu_runbook.md starts each call with it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: imported inside functions by the recipes and metrics: module -> what provides it on the GPU machine
LAZY = {
    "hydra": "the hydra_core wheel: carry .gpu/wheels_core and `source .gpu/setup.sh` first",
    "omegaconf": "the omegaconf wheel: carry .gpu/wheels_core and `source .gpu/setup.sh` first",
    "cleanfid.fid": "the clean_fid wheel: carry .gpu/wheels_core and `source .gpu/setup.sh` first",
    "matplotlib": "the GPU image (matplotlib is in its package list)",
    "scipy.linalg": "the GPU image",
    "sklearn": "the GPU image (scikit-learn)",
    "torch.utils.tensorboard": "the GPU image (tensorboard)",
    "timm": "the GPU image",
    "accelerate": "the GPU image",
    "safetensors": "the GPU image",
    "PIL": "the GPU image (pillow)",
    "yaml": "the GPU image (pyyaml)",
}


def import_script(path: Path) -> None:
    """Execute a script's module body (imports and definitions) without running it as ``__main__``."""
    spec = importlib.util.spec_from_file_location(f"preflight_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def check(scripts: list[Path], paths: list[Path], cuda: bool) -> list[str]:
    """Every problem found, each a sentence naming the thing and what to do."""
    problems = []
    for name, source in LAZY.items():
        try:
            importlib.import_module(name)
        except ImportError as err:
            problems.append(f"import {name}: {err} (comes from {source})")
    for script in scripts:
        if not script.is_file():
            problems.append(f"script {script}: not found")
            continue
        try:
            import_script(script)
        except ImportError as err:
            problems.append(f"script {script}: {err}")
        print(f"preflight: imported {script}", flush=True)
    for path in paths:
        if not path.exists():
            problems.append(f"path {path}: not found (is it in the call's carry list?)")
    setup, committed = Path(".gpu/setup.sh"), REPO / "scripts" / "gpu_setup.sh"
    if setup.is_file() and setup.read_bytes() != committed.read_bytes():
        problems.append(f"{setup} differs from {committed.relative_to(REPO)}: run `bash "
                        "scripts/gpu_prepare.sh` where the calls are sent from (it copies it), then send "
                        "the call again")
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"preflight: torch {torch.__version__}, {name}, python {sys.version.split()[0]}", flush=True)
    if cuda and not torch.cuda.is_available():
        problems.append("--cuda: torch sees no CUDA device")
    return problems


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", type=Path, nargs="*", default=[], help="script files to import")
    p.add_argument("--paths", type=Path, nargs="*", default=[], help="files or folders that must exist")
    p.add_argument("--cuda", action="store_true", help="fail without a CUDA device")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))  # the scripts import the project (as PYTHONPATH=$PWD does on the GPU box)
    problems = check(args.scripts, args.paths, args.cuda)
    for problem in problems:
        print(f"preflight: PROBLEM: {problem}", file=sys.stderr)
    print(f"preflight: {'ok' if not problems else f'{len(problems)} problem(s)'}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
