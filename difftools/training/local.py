"""A run confined to this process: the part of ``accelerate.Accelerator`` the engine uses, without
accelerate's process-wide state.

``accelerate`` keeps one ``AcceleratorState`` per process: once a run made an Accelerator, another
with a different precision or device is refused ("AcceleratorState has already been initialized"),
and under ``accelerate launch`` every Accelerator spans all ranks, so a model trained by rank 0
alone (e.g. the metric classifier, trained when a DiT run's final evaluation first needs it) would
wait forever for the other ranks' gradients. Library code that trains a small model in passing
hands the :class:`~difftools.training.Trainer` a ``LocalAccelerator`` instead::

    Trainer(objective, config, accelerator=LocalAccelerator("cuda:1"))

One process, one device, no DDP: ``prepare`` wraps nothing, reductions are identities, bf16
autocast on CUDA (``mixed_precision="auto"``), fp32 on the CPU.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import DistributedType

from difftools.device import default_device

MIXED_PRECISION = ("auto", "bf16", "no")


class _Optimizer:
    """The optimizer as ``accelerate`` hands it back: the torch optimizer is ``.optimizer`` (the engine
    sets its ``found_inf`` there); everything else is the optimizer's own."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


class LocalAccelerator:
    """Single-process stand-in for ``accelerate.Accelerator`` (module docstring).

    Args:
        device: ``None`` / ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        mixed_precision: ``auto`` (bf16 on CUDA, none on the CPU), ``bf16`` or ``no``.
    """

    process_index = 0
    num_processes = 1
    is_main_process = True
    scaler = None  # bf16 needs no loss scaling
    distributed_type = DistributedType.NO  # one process: no DDP / FSDP wrapping
    is_fsdp2 = False

    def __init__(self, device=None, mixed_precision: str = "auto"):
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        self.device = default_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if mixed_precision == "auto":
            mixed_precision = "bf16" if self.device.type == "cuda" else "no"
        self.mixed_precision = mixed_precision

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return module, _Optimizer(optimizer)

    def autocast(self):
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def no_sync(self, module: torch.nn.Module):
        return contextlib.nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        """One process: there is nobody to wait for."""
