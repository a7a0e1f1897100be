"""facebookresearch/DiT imported from a local folder (its ``models.py`` and ``diffusion/``), never
copied into this project: the reference rows of ``scripts/bench_train.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_reference(folder: Path):
    """Import facebookresearch/DiT's models.py and diffusion/ from ``folder`` under private module names."""
    models_py, diffusion_init = folder / "models.py", folder / "diffusion" / "__init__.py"
    for path in (models_py, diffusion_init):
        if not path.is_file():
            raise FileNotFoundError(
                f"--reference {folder}: {path} not found. Put facebookresearch/DiT's models.py and its "
                "diffusion/ package there (e.g. git show HEAD:models.py > DIR/models.py from a clone)."
            )
    spec = importlib.util.spec_from_file_location("ref_dit_models", models_py)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    spec = importlib.util.spec_from_file_location(
        "ref_dit_diffusion", diffusion_init, submodule_search_locations=[str(folder / "diffusion")]
    )
    diffusion = importlib.util.module_from_spec(spec)
    sys.modules["ref_dit_diffusion"] = diffusion  # its relative imports resolve through this name
    spec.loader.exec_module(diffusion)
    return models, diffusion.create_diffusion
