"""SiT checkpoints (willisma/SiT; Ma et al., arXiv 2401.08740) -> difftools.

SiT's network is DiT's (same modules and parameter names, ``SiT-XL/2`` = ``DiT-XL/2`` sizes), trained
on SiT's linear interpolant instead of DDPM. With s SiT's time, data x and noise n:

    SiT:   x_s = s x + (1 - s) n,   the network predicts the velocity v = dx_s/ds = x - n,
           and embeds s itself (no factor 1000);
    ours:  x_t = (1 - t) x + t n    (:class:`~samplers.process.Flow`), prediction ``flow`` = dx_t/dt = n - x.

So t = 1 - s, x_t = x_s, and our velocity is minus SiT's: the converted model embeds 1 - t
(``time_scale=-1, time_shift=1``) and its final Linear's prediction rows are negated (exact). A SiT model
trained with ``--prediction noise`` predicts n, our ``eps``, with no sign change. Score models
(``--prediction score``: -n / (1 - s)) have no time-independent linear map to a difftools prediction and
are refused; so are checkpoints of SiT's GVP and VP paths, which are not the linear interpolant (the
weights do not say which path trained them: that is for the user to know).

SiT's forward drops the learned-sigma channels (``learn_sigma`` is True for its 256x256 models); they
are kept unused (``return_sigma=False``) or dropped, as for DiT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from difftools.interop.common import ConversionError, provenance, read_state_dict, write_checkpoint
from difftools.interop.dit import model_from_reference, reference_config
from difftools.models.dit import DiT
from samplers.process import Flow

SOURCE = "willisma/SiT"
#: SiT's ``--prediction`` -> (difftools prediction, negate the output)
PREDICTIONS = {"velocity": ("flow", True), "noise": ("eps", False)}
#: the converted model embeds time_scale t + time_shift = 1 - t, SiT's own time
TIME_SCALE, TIME_SHIFT = -1.0, 1.0


def model_from_sit(
    state: Mapping, ref: Mapping, *, source: str, prediction: str = "velocity", drop_sigma: bool = False
) -> DiT:
    """The difftools DiT (for :class:`~samplers.process.Flow`) holding a SiT state dict of config ``ref``."""
    if prediction not in PREDICTIONS:
        raise ConversionError(
            f"SiT prediction {prediction!r} cannot be converted; supported: "
            f"{sorted(PREDICTIONS)} (a score model's output -n / (1 - s) has no "
            "time-independent linear map to a difftools prediction type)"
        )
    _, negate = PREDICTIONS[prediction]
    return model_from_reference(
        state,
        ref,
        source=source,
        drop_sigma=drop_sigma,
        time_scale=TIME_SCALE,
        time_shift=TIME_SHIFT,
        negate_prediction=negate,
    )


def convert(
    weights: str | os.PathLike,
    config: Mapping | str | os.PathLike,
    out: str | os.PathLike,
    *,
    prediction: str = "velocity",
    drop_sigma: bool = False,
    weights_key: str | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
    autoencoder=None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Convert a SiT checkpoint (linear path) into a difftools checkpoint directory ``out``.

    ``weights``: the released ``SiT-XL-2-256x256.pt``, a training checkpoint of SiT's train.py
    (``weights_key``: ``"ema"`` by default) or a safetensors file. ``config``: a mapping, a JSON / YAML
    file of SiT's constructor arguments, or a name such as ``"SiT-XL/2"``. ``prediction``: what the model
    was trained to predict (SiT's ``--prediction``: velocity, the default, or noise).
    """
    ref = reference_config(config, input_size=input_size, num_classes=num_classes, family="SiT")
    state = read_state_dict(weights, weights_key)
    model = model_from_sit(
        state, ref, source=f"{weights} ({SOURCE} layout)", prediction=prediction, drop_sigma=drop_sigma
    )
    ours, negate = PREDICTIONS[prediction]
    sigma = "none" if not ref["learn_sigma"] else ("dropped" if drop_sigma else "kept (not returned)")
    interop = provenance(
        SOURCE,
        weights,
        reference_config=ref,
        learned_sigma=sigma,
        time="t = 1 - s",
        prediction=f"SiT {prediction} -> {ours}" + (" (negated)" if negate else ""),
    )
    return write_checkpoint(
        out,
        model,
        process=Flow(),
        prediction=ours,
        interop=interop,
        autoencoder=autoencoder,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )
