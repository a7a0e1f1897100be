"""Several processes on the CPU (gloo), started as users start them: scripts/launch.sh -> accelerate
launch (a shipped conf/accelerate config) -> torchrun.

* train/dit.py on 2 processes (DDP, and FSDP2) gives the losses of 1 process at the same global batch,
  and its checkpoints resume on 1 process; a 1-process checkpoint resumes on 2 (issue 18 item 5,
  issue 19 item 4). Tolerance: relative 1e-5 on every step's loss (observed: <= 3e-7). Not exact
  because DDP averages per-process gradient means and all-reduces them, one process takes the mean
  of the whole batch: the same numbers summed in another order.
* scripts/sample.py on 2 processes writes the images of 1 process, and the distance from the
  gathered features is 1 process's (issue 19 item 3).
* NVLink multicast stays off in every process the launcher starts (issue 19 item 5).

The pieces run in-process too: global-batch noise rows, gathered features, the launch checks and the
config files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5

# a tiny digits run: 6 steps of a 2-block DiT, checkpoints at steps 3 and 6, the loss logged every step.
# Label dropout off: the DiT draws it from the global RNG, which is per process (seed + rank).
TRAIN = ["model.class_dropout_prob=0", "model.depth=2", "trainer.max_steps=6", "trainer.log_every=1",
         "trainer.ckpt_every=3", "trainer.keep_last=0", "trainer.sample_every=0", "trainer.sample_num=4",
         "trainer.sample_steps=2", "trainer.progress=false", "trainer.tensorboard=false",
         "eval.enabled=false"]
NVLS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``scripts/launch.sh --config_file conf/accelerate/<config> <args>`` on the CPU; fails the test
    with the output's tail when it fails."""
    cmd = ["bash", str(REPO / "scripts" / "launch.sh"), "--config_file",
           str(REPO / "conf" / "accelerate" / config), "--main_process_port", str(free_port()), *args]
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-5000:])
    return proc


def logged_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state" / "trainer.json").read_text())


def train_one_process(out_dir: Path, *overrides: str) -> list[float]:
    """What ``python train/dit.py <TRAIN> <overrides>`` does, in this process (no start-up cost)."""
    from hydra import compose, initialize_config_dir

    from difftools.training import Trainer

    dit = load_module("dit_recipe", REPO / "train" / "dit.py")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("dit", overrides=[*TRAIN, *overrides])
    tcfg = dit.check_config(cfg)
    dataset, objective = dit.build_objective(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same float sums
    try:
        result = Trainer(objective, tcfg, out_dir, dataset=dataset,
                         run_config=OmegaConf.to_container(cfg, resolve=True)).train()
    finally:
        torch.set_num_threads(threads)
    return result.losses


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, list[float]]:
    """The reference: the run on one process (checkpoints at steps 3 and 6) and its per-step losses."""
    run = tmp_path_factory.mktemp("one") / "run"
    losses = train_one_process(run)
    assert len(losses) == 6 and len(set(losses)) == 6
    return run, losses


def check_two_processes(one_process, tmp_path, config: str, data_parallel: str) -> None:
    """One launch, two Hydra jobs: a fresh 2-process run and a 2-process resume of the 1-process
    checkpoint at step 3; then a 1-process resume of the 2-process checkpoint at step 3."""
    one, one_losses = one_process
    sweep = tmp_path / "sweep"
    launch(config, ["train/dit.py", "-m", *TRAIN, f"hydra.sweep.dir={sweep}",
                    f"trainer.resume=null,{one / 'checkpoints' / 'step_0000003'}"])
    fresh, resumed = sweep / "0", sweep / "1"
    state = trainer_state(fresh / "checkpoints" / "step_0000006")
    assert (state["world_size"], state["data_parallel"], state["noise"]) == (2, data_parallel, "global_batch")
    assert sorted(p.name for p in (fresh / "checkpoints" / "step_0000003" / "state").glob("rng_*.pt")) == [
        "rng_0.pt", "rng_1.pt"]
    # the same losses as one process at the same global batch
    np.testing.assert_allclose(logged_losses(fresh), one_losses, rtol=LOSS_RTOL)
    # 1 -> 2 processes: the resumed steps are the uninterrupted run's
    np.testing.assert_allclose(logged_losses(resumed), one_losses[3:], rtol=LOSS_RTOL)
    # 2 -> 1 process
    back = train_one_process(tmp_path / "back", f"trainer.resume={fresh / 'checkpoints' / 'step_0000003'}")
    np.testing.assert_allclose(back, one_losses[3:], rtol=LOSS_RTOL)
    # full weights on disk whatever the sharding: the final EMA weights agree with one process's
    for run in (fresh, resumed, tmp_path / "back"):
        ours = load_file(run / "checkpoints" / "step_0000006" / "ema.safetensors")
        ref = load_file(one / "checkpoints" / "step_0000006" / "ema.safetensors")
        assert ours.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"{run}: {k}")


@pytest.mark.slow
def test_ddp_two_processes_match_one_and_resume_on_either(one_process, tmp_path):
    check_two_processes(one_process, tmp_path, "ddp_2gpu.yaml", "DDP")


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_on_either(one_process, tmp_path):
    """conf/accelerate/fsdp_2gpu.yaml as shipped: on the CPU the trainer installs accelerate's FSDP
    plugin itself (accelerate applies it to GPU process groups only), so the FSDP2 path -- sharded
    parameters, EMA and AdamW moments, full tensors gathered into the checkpoint and cut again on
    resume -- runs here; its losses equal DDP's (both equal one process's)."""
    check_two_processes(one_process, tmp_path, "fsdp_2gpu.yaml", "FSDP2")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::difftools.metrics.stats.FrechetSampleSizeWarning")  # n = 21 < d
def test_sampling_and_evaluation_sharded_over_two_processes(one_process, tmp_path, monkeypatch):
    one, _ = one_process
    monkeypatch.setenv("DIFFTOOLS_CACHE", str(tmp_path / "cache"))  # the metric classifier, trained once
    sample = load_module("sample_script", REPO / "scripts" / "sample.py")
    # 21 images: shards of 11 and 10; batch 1, so each image is drawn by the same kernels either way
    over = {"ckpt": str(one / "checkpoints" / "step_0000006"), "steps": 3, "num_samples": 21, "seed": 5,
            "batch_size": 1, "progress": False, "precision": "fp32", "save": {"grid": False}}
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.pop("hydra")
    cfg.merge_with(OmegaConf.create(over))
    single = tmp_path / "single"
    single.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec1 = sample.run(cfg, single)
    finally:
        torch.set_num_threads(threads)
    sharded = tmp_path / "sharded"
    launch("ddp_2gpu.yaml", ["scripts/sample.py", *(f"{k}={v}" for k, v in (
        ("ckpt", over["ckpt"]), ("steps", 3), ("num_samples", 21), ("seed", 5), ("batch_size", 1),
        ("progress", "false"), ("precision", "fp32"), ("save.grid", "false"), ("out", sharded),
        ("hydra.run.dir", tmp_path / "hydra")))], env={"DIFFTOOLS_CACHE": str(tmp_path / "cache")})
    rec2 = json.loads((sharded / "metrics.json").read_text())
    assert (rec1["world_size"], rec2["world_size"]) == (1, 2)
    # every promised file, and no shard file left behind
    assert sorted(p.name for p in sharded.iterdir()) == ["images", "metrics.json", "samples.npz"]
    with np.load(single / "samples.npz") as a, np.load(sharded / "samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert sorted(p.name for p in (sharded / "images").iterdir()) == [f"{i:06d}.png" for i in range(21)]
    name = "fd_clf_digits16"
    m1, m2 = rec1["metrics"][name], rec2["metrics"][name]
    assert m2["n_samples"] == m1["n_samples"] == 21
    # features taken per process and gathered: the single-process distance up to float round-off
    assert m2[name] == pytest.approx(m1[name], rel=1e-6) and m2["kid"] == pytest.approx(m1["kid"], rel=1e-5,
                                                                                      abs=1e-9)
    assert m2["class_accuracy"] == m1["class_accuracy"]
    assert m2["protocol"]["a_sha256"] == m1["protocol"]["a_sha256"]  # the same pixels, in the same order


@pytest.mark.slow
def test_launcher_keeps_nvlink_multicast_off_in_every_process(tmp_path):
    """Launched with the variables unset (and one set the other way), every rank and a child it starts
    see multicast off."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, subprocess, sys\n"
        f"keys = {list(NVLS)!r}\n"
        "code = 'import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))' % (keys,)\n"
        "out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout\n"
        "child = json.loads(out)\n"
        # one file per rank: two ranks printing to one pipe can interleave their lines
        "report = {'rank': os.environ['RANK'], 'self': {k: os.environ.get(k) for k in keys},"
        " 'child': child}\n"
        f"open(os.path.join({str(tmp_path)!r}, 'probe_' + os.environ['RANK'] + '.json'), 'w')"
        ".write(json.dumps(report))\n")
    with pytest.MonkeyPatch.context() as mp:
        for k in NVLS:
            mp.delenv(k, raising=False)
        launch("ddp_2gpu.yaml", [str(probe)], env={"NCCL_NVLS_ENABLE": "1"})
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("probe_*.json"))]
    assert sorted(r["rank"] for r in reports) == ["0", "1"]
    for r in reports:
        assert r["self"] == NVLS_OFF and r["child"] == NVLS_OFF


# ---------------------------------------------------------------------- in-process pieces
def test_noise_drawn_for_the_global_batch_equals_one_process():
    """Two processes each holding half of a global batch draw exactly the t and eps one process draws
    for the whole batch (each from a generator seeded alike), so their per-sample losses are one
    process's."""
    from difftools.losses import DenoisingLoss
    from difftools.process import Flow

    x0, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    net = lambda x, t, y: x * t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)  # noqa: E731

    def terms(rank, world, rows):
        loss = DenoisingLoss(Flow(), "flow", t_distribution="logit_normal").hold_rows(rank, world)
        return loss.terms(net, x0[rows], y[rows], generator=torch.Generator().manual_seed(3))

    whole = terms(0, 1, slice(None))
    halves = [terms(r, 2, slice(4 * r, 4 * r + 4)) for r in range(2)]
    for field in ("t", "eps", "x_t", "per_sample"):
        torch.testing.assert_close(torch.cat([getattr(h, field) for h in halves]), getattr(whole, field),
                                   rtol=0, atol=0)
    # drawn per process instead (each its own batch from the same stream), rank 1 would repeat rank 0
    alone = DenoisingLoss(Flow(), "flow").terms(net, x0[4:], y[4:],
                                                generator=torch.Generator().manual_seed(3))
    assert not torch.equal(alone.eps, halves[1].eps)
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        DenoisingLoss(Flow(), "flow").hold_rows(2, 2)


def test_denoising_objective_draws_for_the_global_batch_only_with_known_losses():
    from types import SimpleNamespace

    from difftools.losses import DenoisingLoss
    from difftools.losses.alignment import AlignedLoss
    from difftools.process import Flow
    from difftools.testing import tiny_dit
    from difftools.training import DenoisingObjective, Objective

    model = tiny_dit(16, 1, 10)
    plain = DenoisingLoss(Flow(), "flow")
    aligned = AlignedLoss(DenoisingLoss(Flow(), "flow"), model.hidden_size, model.patch_size, 1)
    run = SimpleNamespace(rank=1, world_size=2, config=SimpleNamespace(sample_num=4, sample_solver="ddim",
                          sample_steps=2, sample_cfg_scale=1.0, seed=0))
    for loss, inner in ((plain, plain), (aligned, aligned.denoise)):
        objective = DenoisingObjective(model, loss, Flow(), "flow")
        assert objective.global_batch_noise
        objective.on_start(run, None)
        assert (inner.rank, inner.world_size) == (1, 2)

    class OwnNoise(torch.nn.Module):  # a loss that draws numbers of its own: per-process streams stay
        def forward(self, model, x0, y=None, generator=None):
            return torch.randn((), generator=generator), {}

    assert not DenoisingObjective(model, OwnNoise(), Flow(), "flow").global_batch_noise
    assert Objective.global_batch_noise is False


def test_gathered_features_score_like_one_process():
    """Features taken per process (strided shards of unequal size, and a process with no images) and
    gathered in index order give the Fréchet distance, KID, n and pixel hash of all images at once."""
    from difftools.metrics.evaluate import gather_shares, images_sha256, score, score_features, shard_features
    from difftools.metrics.features import PixelFeatures
    from difftools.metrics.stats import stats_from_features

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8, generator=g)
    ext = PixelFeatures(1, pool=2)
    ref = stats_from_features(np.random.default_rng(1).random((40, ext.dim), dtype=np.float32), ext, "ref")
    whole = score(images, None, ext, ref, with_kid=True)
    shards = [list(range(r, 23, 4)) for r in range(4)] + [[]]  # 6, 6, 6, 5 images and none
    shares = [shard_features(images[idx], None, ext) for idx in shards]
    order = torch.tensor([i for idx in shards for i in idx]).argsort().numpy()
    gathered = score_features(gather_shares(shares, order), ext, ref, True, "samples", images_sha256(images))
    metric = whole["metric"]
    assert gathered["n_samples"] == 23 and gathered[metric] > 0
    assert gathered[metric] == pytest.approx(whole[metric], rel=1e-12)
    assert gathered["kid"] == pytest.approx(whole["kid"], rel=1e-12)
    assert gathered["protocol"]["a_sha256"] == whole["protocol"]["a_sha256"]
    # concatenated in process order instead, rows would not line up with the images' order
    assert not np.array_equal(gather_shares(shares)["feats"], gather_shares(shares, order)["feats"])


def test_lone_cpu_launch_is_named(monkeypatch):
    """``accelerate launch --cpu --num_processes 2`` runs the script once with this environment (no
    world size): the warning says so and names the command that starts 2 processes."""
    from difftools.device import lone_cpu_launch

    for key in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    message = lone_cpu_launch()
    assert "started this process alone" in message and "--multi_gpu --num_processes N" in message
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's workers
    assert lone_cpu_launch() is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("MASTER_ADDR")  # --num_processes 1: no rendezvous address
    assert lone_cpu_launch() is None


def test_trainer_keeps_nvlink_multicast_off_unless_set(monkeypatch):
    from difftools.training import TrainerConfig
    from difftools.training.trainer import make_accelerator

    for key in NVLS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "1")
    make_accelerator(TrainerConfig(device="cpu"))
    assert {k: os.environ[k] for k in NVLS} == NVLS_OFF
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # a value exported by the user is theirs
    from difftools.device import keep_nvlink_multicast_off

    assert keep_nvlink_multicast_off()["NCCL_NVLS_ENABLE"] == "1"


@pytest.mark.parametrize("n", [2, 4, 8])
def test_accelerate_configs(n):
    """The shipped configs load with accelerate's own reader and say what the docs promise."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    import difftools.models.dit as dit

    ddp = load_config_from_file(str(REPO / "conf" / "accelerate" / f"ddp_{n}gpu.yaml"))
    assert (ddp.distributed_type, ddp.num_processes, ddp.num_machines) == (DistributedType.MULTI_GPU, n, 1)
    fsdp = load_config_from_file(str(REPO / "conf" / "accelerate" / f"fsdp_{n}gpu.yaml"))
    assert (fsdp.distributed_type, fsdp.num_processes) == (DistributedType.FSDP, n)
    c = fsdp.fsdp_config
    assert c["fsdp_version"] == 2 and c["fsdp_reshard_after_forward"] is True
    assert c["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # the class named is the DiT's block, and a DiT is made of them
    block = getattr(dit, c["fsdp_transformer_layer_cls_to_wrap"])
    model = dit.DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    assert sum(isinstance(m, block) for m in model.modules()) == 2
