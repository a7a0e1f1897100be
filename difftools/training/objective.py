"""What a training recipe gives the engine: an :class:`Objective`.

The engine (:class:`difftools.training.Trainer`) owns the optimisation loop: device and bf16,
seeding, gradient accumulation, clipping, the NaN/inf stop, EMA, optimizer and LR schedule,
checkpoints and exact resume, the run lock, logging, previews and evaluation callbacks. A recipe
only says what one step computes from a batch, as an ``nn.Module``::

    class Regression(Objective):
        kind = "classifier"                      # the checkpoint kind (difftools.load)

        def __init__(self, model, teacher):
            super().__init__(model)              # self.model: trained, exported, EMA-averaged
            self.register_frozen("teacher", teacher)   # moved with the objective, never trained or saved

        def forward(self, batch, generator):
            x, _ = batch
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            loss = (self.model(x + noise) - self.teacher(x)).pow(2).mean()
            return loss, {"noise_std": noise.std()}

    Trainer(Regression(net, teacher), TrainerConfig(max_steps=1000), "runs/reg", dataset=ds).train()

What is saved where (one layout for every recipe):

* ``self.model``: ``model.safetensors`` (and its EMA in ``ema.safetensors``);
* every other submodule that is not frozen (e.g. an alignment projector): trained with the model
  and saved in ``state/objective.safetensors``, never exported;
* :meth:`extra_state` (tensors that change but are not trained, e.g. NFT's old policy or a
  generator's state): ``state/objective.safetensors`` under ``extra/<key>``;
* frozen helpers (:meth:`register_frozen`: an autoencoder, a reward model, a teacher): nothing;
  the recipe rebuilds them.

Every hook but :meth:`forward` has a default that does nothing, so a recipe overrides only what
it needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from difftools import checkpoint as ckpt_io

if TYPE_CHECKING:
    from difftools.training.trainer import TrainerConfig

EXTRA_PREFIX = "extra/"  #: key prefix of :meth:`Objective.extra_state` in state/objective.safetensors


@dataclass(frozen=True)
class RunInfo:
    """What the engine tells an objective about the run (passed to :meth:`Objective.batches` and
    :meth:`Objective.on_start`).

    Attributes:
        accelerator: the ``accelerate.Accelerator`` (``autocast()``, ``gather``, ``reduce``).
        config: the :class:`TrainerConfig`.
        generator: the engine's noise generator (on ``device``; saved in ``state/rng_<rank>.pt``):
            seeded per process, or alike on every process for an objective with
            ``global_batch_noise``. The same object is passed to :meth:`Objective.forward`.
        dataset: the dataset given to the Trainer, or None.
        out_dir: the run directory, or None for a run that writes nothing.
    """

    accelerator: Any
    config: TrainerConfig
    generator: torch.Generator
    dataset: Any = None
    out_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def per_device_batch(self) -> int:
        """``config.batch_size`` (the global batch of one forward pass) over the processes."""
        return self.config.batch_size // self.world_size


class Objective(nn.Module):
    """One training recipe: what an optimisation step computes from a batch (module docstring).

    Args:
        model: the trained network; exported to ``model.safetensors``, averaged by the EMA,
            loaded by ``difftools.load``.
    """

    #: checkpoint kind written to config.yaml (``dit``, ``classifier``, ...; see difftools.checkpoint)
    kind: str = "dit"
    #: False: the engine's noise generator is seeded per process (seed + rank) and each process
    #: draws for its own rows. True: it is seeded alike on every process and the objective draws
    #: every random number for the whole global batch and keeps its rows (RunInfo.rank /
    #: world_size), so a step does not depend on the number of processes and the noise stream
    #: resumes on any number of them (DenoisingObjective with a DenoisingLoss).
    global_batch_noise: bool = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._frozen: list[str] = []

    # ------------------------------------------------------------------ what a recipe defines
    def forward(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, Mapping[str, Any]]:
        """The loss of one (micro-)batch and logs to average into ``metrics.jsonl``.

        Runs under the engine's autocast (bf16 on CUDA). ``batch`` is what the data source yields,
        moved to the device (tensors inside tuples, lists and dicts). ``generator`` is the engine's
        noise generator (per process, or alike on every process with :attr:`global_batch_noise`):
        draw every random number of the step from it (or from generators the objective saves in
        :meth:`extra_state`) for exact resume. Log values are
        0-dim tensors or floats; every process must return the same keys.
        """
        raise NotImplementedError(f"{type(self).__name__} must define forward(batch, generator)")

    def batches(self, start: int, run: RunInfo) -> Iterator | None:
        """The data, or None to let the engine read ``run.dataset`` (resumable order, see
        :mod:`difftools.training.state`).

        An objective that makes its own data (samples it collects, a text corpus, tensors already on
        the device) returns an infinite iterator of batches that starts at batch ``start``, the
        number of batches the run consumed before (``step * grad_accum``). For exact resume, batch
        k must be a pure function of (k, seed, rank, world size) -- or of state the objective saves
        in :meth:`extra_state`. Example: ``return (self.batch_at(k) for k in itertools.count(start))``.
        """
        return None

    def on_start(self, run: RunInfo, resumed_from: Path | None) -> None:
        """Called once before the first step, on the device, after a resume restored the state from
        checkpoint ``resumed_from`` (None on a fresh run). E.g. fit a latent scale on a fresh run,
        check the resumed checkpoint's config.yaml, or keep ``run`` for :meth:`batches`."""

    def after_step(self, step: int) -> Mapping[str, Any]:
        """Called after optimizer step ``step`` (counted from 1) and the EMA update, on every
        process (e.g. NFT's soft old-policy update). Returns logs, handled like :meth:`forward`'s."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors that change during training without being trained (saved, restored on resume)."""
        return {}

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`extra_state`."""
        if state:
            raise ckpt_io.CheckpointError(
                f"the checkpoint has extra objective state {sorted(state)[:5]}, but "
                f"{type(self).__name__} does not define load_extra_state")

    def checkpoint_meta(self, step: int) -> dict:
        """The ``checkpoint`` node of config.yaml (what ``difftools.load`` rebuilds the model from).

        The default suits non-denoisers (``kind`` in ``difftools.checkpoint.NON_DENOISER_KINDS``);
        a denoiser adds its process and prediction (see :class:`DenoisingObjective`)."""
        return ckpt_io.checkpoint_meta(self.model, kind=self.kind, step=step)

    def preview(self, ema_model: nn.Module, step: int, samples_dir: Path) -> Path | None:
        """Write a preview (e.g. a sample grid) of the EMA model under ``samples_dir``; main process
        only, every ``sample_every`` steps and at the end. Returns the file written."""
        return None

    def evaluate(self, ema_model: nn.Module, step: int) -> Mapping[str, float]:
        """Evaluation callback (every ``eval_every`` steps and at the end, and at ``eval_at``), on
        every process; the main process's numbers are logged as ``eval/<key>``."""
        return {}

    # ------------------------------------------------------------------ frozen helpers
    def register_frozen(self, name: str, module: nn.Module | None) -> nn.Module | None:
        """Hold ``module`` as a frozen helper: moved to the device with the objective and kept in
        eval mode, but never trained (``requires_grad`` off), never saved, and left out of DDP's
        gradient and buffer synchronisation. Returns the module (None is allowed, e.g. no
        autoencoder)."""
        if module is not None:
            module.requires_grad_(False)
            module.eval()
        self.register_module(name, module)
        if name not in self._frozen:
            self._frozen.append(name)
        return module

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return tuple(self._frozen)

    def train(self, mode: bool = True) -> Objective:
        """Train mode for the model and the trained submodules; frozen helpers stay in eval mode."""
        super().train(mode)
        for name in self._frozen:
            module = getattr(self, name)
            if module is not None:
                module.eval()
        return self


# ---------------------------------------------------------------------- engine side
def _skipped(key: str, objective: Objective) -> bool:
    """Keys of the exported model and of frozen helpers."""
    return any(key.startswith(prefix + ".") for prefix in ("model", *objective.frozen_names))


def trained_state(objective: Objective) -> dict[str, torch.Tensor]:
    """What ``state/objective.safetensors`` holds: the state of the trained submodules other than
    ``model``, plus :meth:`Objective.extra_state` under ``extra/``."""
    state = {k: v for k, v in objective.state_dict().items() if not _skipped(k, objective)}
    for k, v in objective.extra_state().items():
        state[EXTRA_PREFIX + k] = v
    return state


def load_trained_state(objective: Objective, state: Mapping[str, torch.Tensor], source) -> None:
    """Inverse of :func:`trained_state`; ``source`` names the file in errors."""
    own = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in state.items() if k.startswith(EXTRA_PREFIX)}
    expected = {k for k in objective.state_dict() if not _skipped(k, objective)}
    if set(own) != expected:
        raise ckpt_io.CheckpointError(
            f"{source} does not match this objective: missing {sorted(expected - set(own))[:5]}, "
            f"unexpected {sorted(set(own) - expected)[:5]} (was it written by another recipe or loss?)")
    objective.load_state_dict(own, strict=False)
    objective.load_extra_state(extra)


def frozen_parameter_names(objective: Objective) -> list[str]:
    """Fully qualified names of the frozen helpers' parameters and buffers (for DDP to ignore)."""
    names = []
    for name in objective.frozen_names:
        module = getattr(objective, name)
        if module is not None:
            names += [f"{name}.{k}" for k, _ in module.named_parameters()]
            names += [f"{name}.{k}" for k, _ in module.named_buffers()]
    return names


def check_model_not_shared(objective: Objective) -> None:
    """A submodule that stores the model (instead of receiving it at call time) would save the
    model's weights a second time, in the objective state."""
    model_ids = {id(p) for p in objective.model.parameters()}
    for name, p in objective.named_parameters(remove_duplicate=False):
        if not name.startswith("model.") and id(p) in model_ids:
            raise ValueError(f"objective parameter {name} is one of the model's parameters: a submodule "
                             "holds the model; pass the model at call time instead of storing it")
