"""difftools: train diffusion transformers and sample from them fast."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(ckpt_dir, use_ema: bool = True, device="cpu", verify: bool = True):
    """Rebuild a trained model from a checkpoint directory (see :func:`difftools.checkpoint.load`).

    Returns a :class:`difftools.loaded.Loaded` (model, process, prediction, autoencoder, config,
    dataset_info, path, step) that also gives what sampling needs: ``model_fn()``, ``sample_shape``,
    ``num_classes`` / ``null_class``, ``labels(indices)``, ``decode_uint8(samples)`` and
    ``reference_dataset()``.
    ``verify=False`` accepts weight files whose sha256 differs from the one recorded at save time
    (weights edited on purpose). Imported lazily so that ``import difftools`` stays light.
    """
    from difftools.checkpoint import load as _load

    return _load(ckpt_dir, use_ema=use_ema, device=device, verify=verify)
