"""Device choice shared by the library, the training recipes and the scripts (no heavy imports)."""

from __future__ import annotations

import os

import torch


def default_device(device=None) -> torch.device:
    """``device`` as a torch.device; None (or "auto"): CUDA when present, else the CPU."""
    if device is None or isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: Environment that keeps NVLink multicast (NVLS) off in NCCL, PyTorch's symmetric memory and NVSHMEM.
#: On GPU hosts shared with others a program that uses multicast can put the host's GPUs out of service,
#: so every launch keeps these set, child processes included (scripts/launch.sh exports them).
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}


def keep_nvlink_multicast_off() -> dict[str, str]:
    """Set :data:`NVLINK_MULTICAST_OFF` in ``os.environ`` where a variable is unset (a value the user
    exported is kept), before any process group or communicator exists: NCCL, torch and NVSHMEM read
    them when they initialise, and child processes (DataLoader workers, compile workers) inherit them.
    Called by the trainer and scripts/sample.py for launches that bypass scripts/launch.sh. Returns
    the variables as they are now."""
    for key, value in NVLINK_MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in NVLINK_MULTICAST_OFF}


_WORLD_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def lone_cpu_launch() -> str | None:
    """A warning when ``accelerate launch --cpu --num_processes N`` (N > 1) started this process alone,
    else None. accelerate's CPU launcher starts several processes only under mpirun; without it, it
    runs the script once, with ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` set but no world size, and
    the run silently trains (or samples) as one process. torchrun, which ``accelerate launch
    --multi_gpu`` and scripts/launch.sh use, starts N processes, and difftools runs them on the CPU
    (gloo) when there is no GPU."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return None
    if any(key in env for key in _WORLD_VARIABLES):
        return None
    return ("accelerate launch --cpu --num_processes N started this process alone (accelerate's CPU "
            "launcher starts several processes only under mpirun), so it runs as 1 process. For N processes "
            "on the CPU use: accelerate launch --multi_gpu --num_processes N --num_machines 1 "
            "--mixed_precision no --dynamo_backend no <script> ... (or scripts/launch.sh, same flags)")
