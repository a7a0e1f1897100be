"""Checkpoints from and to other code bases: facebookresearch/DiT, SiT, diffusers.

* :mod:`.dit`: facebookresearch/DiT (``DiT-XL-2-256x256.pt`` and its train.py checkpoints) -> difftools.
* :mod:`.sit`: willisma/SiT (linear interpolant) -> difftools, with its time flipped and its velocity negated.
* :mod:`.diffusers`: difftools DiT <-> diffusers ``DiTTransformer2DModel`` (+ scheduler config).

Each writes a checkpoint directory that :func:`difftools.load` reads; ``scripts/convert.py`` is the
command line. Conventions (time, prediction, null class, learned sigma) are tabled in docs/interop.md.
"""

from difftools.interop.common import ConversionError, read_state_dict

__all__ = ["ConversionError", "read_state_dict"]
