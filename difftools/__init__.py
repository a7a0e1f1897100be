"""difftools: train diffusion transformers and sample from them fast."""

__version__ = "0.1.0"
