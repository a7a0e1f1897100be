"""Moved to :mod:`difftools.generate` (sample generation is not a metric); these names stay importable
from here so existing code keeps working."""

from difftools.generate import SampleSpec, batches, generate, generate_uint8, image_noise, known_solvers

__all__ = ["SampleSpec", "batches", "generate", "generate_uint8", "image_noise", "known_solvers"]
