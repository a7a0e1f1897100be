"""A whole optimizer step as one CUDA graph (``trainer.cuda_graphs``): forward, backward, gradient
clipping, the NaN/inf skip flag, the fused AdamW update and the EMA update are recorded once and
replayed every step, so the host launches one graph instead of ~1,000 kernels (small models are
bound by those launches and the Python around them, not by the GPU).

How (PyTorch's "whole network capture", torch.cuda.graphs): the first ``warmup`` steps run eagerly
on a side stream (they compile the model, pick kernels and create the optimizer state); the next
step is captured into a graph with static input buffers and then replayed, and so is every step
after it (the batch is copied into the static buffers first). What a graph cannot take as a Python
number is a device tensor updated outside it: the learning rate (fused AdamW with
``capturable=True`` and a tensor lr, which the LR scheduler fills), the EMA weight 1 - d_n, the
``found_inf`` flag. The engine's noise generator is registered with the graph, so every replay
draws fresh noise and the generator's saved state stays exact for resuming. Autocast runs with its
weight-cast cache off (a cached cast would outlive the capture).

Requirements (checked in :class:`~difftools.training.Trainer`): CUDA, one process, no gradient
accumulation, AdamW, and batches of one fixed shape. Numerics equal the eager step's except the EMA,
whose graph form may differ from the eager ``lerp`` by fp32 round-off.
"""

from __future__ import annotations

import torch

from difftools.training.health import skip_flag


def _clone_structure(batch):
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone_structure(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _clone_structure(v) for k, v in batch.items()}
    return batch


def _copy_into(static, batch, where: str = "batch") -> None:
    """Copy ``batch`` into the static buffers of the same structure; a clear error on a shape change."""
    if isinstance(static, torch.Tensor):
        is_tensor = isinstance(batch, torch.Tensor)
        if not is_tensor or batch.shape != static.shape or batch.dtype != static.dtype:
            got = (tuple(batch.shape), batch.dtype) if is_tensor else type(batch).__name__
            raise ValueError(f"trainer.cuda_graphs: {where} changed from "
                             f"{(tuple(static.shape), static.dtype)} to {got}; a captured step needs "
                             "batches of one fixed shape (drop the last partial batch) or "
                             "trainer.cuda_graphs=false")
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, (list, tuple)):
        for i, (s, b) in enumerate(zip(static, batch, strict=True)):
            _copy_into(s, b, f"{where}[{i}]")
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], batch[k], f"{where}[{k!r}]")
    elif static != batch:
        raise ValueError(f"trainer.cuda_graphs: {where} changed from {static!r} to {batch!r}")


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Switch a fused AdamW to ``capturable`` with a device-tensor lr per group (the LR scheduler then
    fills the tensor; ``initial_lr`` stays a float, so computing the schedule never syncs)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)
        if isinstance(group.get("initial_lr"), torch.Tensor):
            group["initial_lr"] = float(group["initial_lr"].detach().cpu())
        group["capturable"] = True


def make_uncapturable(optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`make_capturable` (a run without CUDA graphs resuming a checkpoint of one with
    them): float lr, ``capturable`` off."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"].detach().cpu())
        group["capturable"] = False


class GraphedStep:
    """Callable ``step(batch) -> (loss, logs, grad_norm)`` doing a full optimizer step (see the module
    docstring); returned tensors are fresh copies, safe to keep across steps.

    Args:
        objective: the recipe; its unwrapped ``forward(batch, generator)`` is called (accelerate's
            autocast wrapper is bypassed: autocast here has its cache off).
        model: ``objective.model`` (the EMA's source).
        params: the trained parameters (clipped).
        optimizer: the torch optimizer (not accelerate's wrapper), capturable (:func:`make_capturable`).
        generator: the engine's noise generator (CUDA).
        ema: the :class:`~difftools.training.ema.EMA` or None.
        max_norm: gradient clipping norm (inf: measure only).
        skip_nonfinite: set ``optimizer.found_inf`` from the gradient norm (fused optimizers skip).
        dtype: autocast dtype (None: no autocast).
        warmup: eager steps before the capture.
    """

    def __init__(self, objective, model, params, optimizer, generator, ema, max_norm: float,
                 skip_nonfinite: bool, dtype: torch.dtype | None, warmup: int = 3):
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError("trainer.cuda_graphs needs torch >= 2.5 (CUDAGraph.register_generator_state); "
                               f"this is torch {torch.__version__}")
        self.forward = getattr(objective, "_original_forward", objective.forward)
        self.model, self.params, self.optimizer = model, list(params), optimizer
        self.generator, self.ema, self.max_norm = generator, ema, float(max_norm)
        self.dtype, self.warmup = dtype, int(warmup)
        device = self.params[0].device
        self.found_inf = torch.zeros((), device=device) if skip_nonfinite else None
        self.ema_weight = torch.zeros((), device=device) if ema is not None else None
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch = None
        self.static_out = None
        self.side_stream = torch.cuda.Stream(device=device)

    def _body(self, batch, capturing: bool):
        autocast = torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                                  cache_enabled=False)
        with autocast:
            loss, logs = self.forward(batch, self.generator)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True).detach()
        if self.found_inf is not None:
            self.found_inf.copy_(skip_flag(grad_norm))
            self.optimizer.found_inf = self.found_inf
        self.optimizer.step()
        if self.ema is not None:
            if capturing:
                self.ema.update_with_weight(self.model, self.ema_weight)
            else:
                self.ema.update(self.model)
        logs = {k: torch.as_tensor(v).detach().float() for k, v in logs.items()}
        return loss.detach().float(), logs, grad_norm

    def __call__(self, batch):
        if self.calls < self.warmup:
            self.calls += 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                out = self._body(batch, capturing=False)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return out
        if self.graph is None:
            self._capture(batch)
        else:
            _copy_into(self.static_batch, batch)
        if self.ema_weight is not None:
            self.ema_weight.fill_(1.0 - self.ema.decay_at(self.ema.num_updates))
        self.graph.replay()
        if self.ema is not None:
            self.ema.num_updates += 1
        self.calls += 1
        loss, logs, grad_norm = self.static_out
        return loss.clone(), {k: v.clone() for k, v in logs.items()}, grad_norm.clone()

    def _capture(self, batch) -> None:
        self.static_batch = _clone_structure(batch)
        torch.cuda.synchronize()
        # the graph's backward writes the gradients into its own pool; replays overwrite them
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        try:
            # thread_local: a DataLoader's pin-memory thread may touch CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = self._body(self.static_batch, capturing=True)
        except Exception as err:
            raise RuntimeError("trainer.cuda_graphs: capturing the training step failed "
                               f"({type(err).__name__}: {err}); set trainer.cuda_graphs=false") from err
        self.graph = graph
