"""Fully sharded training (FSDP2, through accelerate's FSDP plugin): full tensors in and out.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter, and so every EMA shadow and
optimizer moment made from it, is a ``DTensor``: each of the N processes holds 1/N of it. The
engine's checkpoints hold full tensors whatever the sharding or the number of processes, so a
checkpoint of an FSDP run resumes on one process, under DDP, or under FSDP on another number of
processes, and ``difftools.load`` reads it like any other:

* out: :func:`full_state` gathers each DTensor (``full_tensor()``, an all-gather: every process
  calls it, in the same order) and keeps the result on the CPU of the process that writes;
* in: :func:`shard_like` cuts each full tensor read from disk into the shard this process holds
  (``distribute_tensor`` with the live tensor's mesh and placements, from the local copy: every
  process read the same file, so nothing is sent).

Without FSDP nothing is a DTensor and every function here returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (``tensor`` itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every process must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(state: Mapping[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered into a full CPU tensor (collective when anything is
    sharded: call on every process). With ``keep`` false the gathered tensors are dropped at once
    (processes that do not write) and ``{}`` is returned; an unsharded state is returned as it is."""
    if not any(isinstance(v, DTensor) for v in state.values()):
        return dict(state) if keep else {}
    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor().cpu()
        if keep:
            out[key] = value
    return out


def shard_like(full: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``full`` with each tensor whose counterpart in ``like`` is a DTensor cut into that DTensor's
    shard (same mesh and placements, dtype and device); other values (and keys ``like`` lacks, for
    the caller's strict check to name) pass unchanged."""
    out = dict(full)
    for key, value in full.items():
        live = like.get(key)
        if isinstance(live, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            value = value.to(device=live.device, dtype=live.dtype)
            out[key] = distribute_tensor(value, live.device_mesh, live.placements, src_data_rank=None)
    return out


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order ``state_dict()`` numbers them (group by group)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict | None:
    """``optimizer.state_dict()`` with every sharded moment gathered (collective: every process);
    the layout is torch's, as a single process writes it. None where ``keep`` is false."""
    state = optimizer.state_dict()
    per_param = {i: full_state(s, keep) for i, s in state["state"].items()}
    return {"state": per_param, "param_groups": state["param_groups"]} if keep else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> dict:
    """A full optimizer state (torch's layout) with each moment cut like the parameter it belongs to,
    for ``optimizer.load_state_dict``. Unchanged when no parameter is sharded."""
    params = _optimizer_params(optimizer)
    if not any(isinstance(p, DTensor) for p in params):
        return full
    state = {}
    for i, s in full["state"].items():
        p = params[int(i)] if int(i) < len(params) else None
        state[i] = {k: _cut(v, p) for k, v in s.items()}
    return {"state": state, "param_groups": full["param_groups"]}


def _cut(value, param) -> object:
    """A per-parameter optimizer value: moments shaped like a sharded parameter are cut like it."""
    if (isinstance(param, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
            and tuple(value.shape) == tuple(param.shape)):
        value = value.to(param.device)
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)
