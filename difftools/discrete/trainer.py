"""A small resumable training loop shared by the teacher and the distillation rounds.

State (model, AdamW, data generator, step, loss history) is written atomically (temp file then
os.replace), so a killed run restarts from its last save and, given the same settings, continues
bit-for-bit as if it had never stopped (tests/test_discrete.py checks this).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from difftools.checkpoint import atomic_file, torch_load


def save_state(path, state: dict) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_state(path) -> dict:
    """The state dict at ``path``, loaded with ``weights_only=True`` (tensors, numbers, lists, dicts:
    nothing is unpickled as code); a corrupt file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (train one with train/mcd.py stage=teacher)"
        )
    return torch_load(path)


def fit(
    model,
    loss_fn,
    steps: int,
    lr: float = 1e-3,
    warmup: int = 100,
    ckpt: str | os.PathLike | None = None,
    save_every: int = 500,
    seed: int = 0,
    time_limit: float | None = None,
    grad_clip: float = 1.0,
    log_every: int = 0,
    log=print,
) -> list[float]:
    """Run ``loss_fn(model, generator) -> scalar`` for ``steps`` AdamW steps (linear warmup, then
    constant lr); stop early after ``time_limit`` seconds. Resumes from ``ckpt`` when it exists.
    Returns the per-step loss history (including steps done before a resume)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step, history = 0, []
    if ckpt is not None and Path(ckpt).is_file():
        state = load_state(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]

    def save():
        if ckpt is not None:
            save_state(
                ckpt,
                dict(
                    model=model.state_dict(),
                    opt=opt.state_dict(),
                    generator=gen.get_state(),
                    step=step,
                    history=history,
                    config=getattr(model, "config", None),
                ),
            )

    start = time.monotonic()
    model.train()
    while step < steps:
        if time_limit is not None and time.monotonic() - start > time_limit:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        loss = loss_fn(model, gen)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fit: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        history.append(loss.item())
        if log_every and step % log_every == 0:
            recent = history[-log_every:]
            log(f"step {step} loss {sum(recent) / len(recent):.4f} ({time.monotonic() - start:.0f}s)")
        if save_every and step % save_every == 0:
            save()
    save()
    model.eval()
    return history
