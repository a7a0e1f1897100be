"""CASO embedding editing (arXiv 2505.14254) and probability-flow ODE inversion: difftools.editing.

Numbers asserted here were measured first (see docs/editing.md), then given safe bounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from difftools.checkpoint import CheckpointError
from difftools.editing.attributes import attribute_dataset, ink_mass
from difftools.editing.caso import EmbeddingDiT, caso_loss, guided_model_fn, released_train_time
from difftools.editing.embeddings import SemanticEmbeddings, load_embeddings, make_embeddings, save_embeddings
from difftools.editing.inversion import edit, invert, regenerate
from difftools.editing.optimize import CasoConfig, CasoObjective, one_step_probability, train_embeddings
from difftools.editing.resources import load_attribute_classifier, load_base, resolve_targets
from difftools.models.dit import DiT
from difftools.process import VP, Flow
from samplers import ModelFn
from tests.mixture import make_mixture

REPO = Path(__file__).resolve().parents[1]
DIGITS_BASE = Path(os.environ.get("DIFFTOOLS_EDIT_BASE", REPO / "runs" / "dit" / "2026-11-23_11-20-28"))


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """One torch thread: the machine is small and shared (and tiny models gain nothing from more)."""
    yield


def tiny_dit(size: int = 8, hidden: int = 32, depth: int = 2, num_classes: int = 3, seed: int = 0) -> DiT:
    """A small DiT whose adaLN-Zero layers are moved off zero, so that the label embedding matters."""
    torch.manual_seed(seed)
    dit = DiT(input_size=size, in_channels=1, patch_size=2, hidden_size=hidden, depth=depth, num_heads=2,
              num_classes=num_classes)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


class Brightness(nn.Module):
    """A fixed two-class attribute classifier: logits (-s m, s m), m = mean pixel value - offset
    (class 0 dark, 1 bright). A parameter and a buffer, so the freeze test has something to watch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.register_buffer("offset", torch.tensor(0.0))
        self.num_classes = 2

    def forward(self, x):
        m = x.float().mean((1, 2, 3)) - self.offset
        return torch.stack([-self.scale * m, self.scale * m], 1)


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ conditioning wrapper
def test_wrapper_equals_dit_and_rejects_bad_embeddings():
    dit = tiny_dit()
    net = EmbeddingDiT(dit)
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 3, 1])  # 3 = null class
    assert torch.equal(net(x, t, y_embed=net.label_embedding(y)), dit(x, t, y))
    assert torch.equal(net(x, t, y=y), dit(x, t, y))
    assert torch.equal(net(x, t), dit(x, t))  # no conditioning = the null class
    # one [D] vector broadcasts over the batch
    e = torch.randn(32)
    assert torch.equal(net(x, t, y_embed=e), net(x, t, y_embed=e.expand(5, -1)))
    with pytest.raises(ValueError, match="conditioning space"):
        net(x, t, y_embed=torch.randn(5, 31))
    with pytest.raises(ValueError, match="not both"):
        net(x, t, y=y, y_embed=e)
    with pytest.raises(ValueError, match="class-conditional"):
        EmbeddingDiT(DiT(8, 1, 2, 32, 1, 2, num_classes=0))


# ------------------------------------------------------------------ inversion
def test_inversion_converges_to_exact_ode_and_reconstructs():
    """Against the exact probability-flow ODE of a Gaussian mixture (scipy DOP853, float64):
    DDIM inversion is first order (error halves when steps double), DPM-Solver++(2M) inversion
    second order, for flow (with the infinite last step at t = 1) and VP; invert + regenerate with
    the same conditioning returns the input with an error that shrinks with the steps."""
    mix = make_mixture(dim=4, num_components=3, std=0.5, radius=1.0)
    for process, pred in ((Flow(), "flow"), (VP(), "eps")):
        mf = mix.model_fn(process, prediction=pred)
        x0, _ = mix.sample(8, generator=torch.Generator().manual_seed(1))
        ref = mix.ode_reference(process, x0, 1e-3, 1.0)
        err = {}
        for solver in ("ddim", "dpmpp_2m"):
            for n in (10, 20, 40):
                x_T = invert(mf, x0, solver=solver, steps=n)
                rec = regenerate(mf, x_T, solver=solver, steps=n)
                err[solver, n] = ((x_T - ref).pow(2).mean().sqrt().item(),
                                  (rec - x0).pow(2).mean().sqrt().item())
        # measured inversion RMSE at 10/20/40 steps (flow | VP): ddim 0.146 0.076 0.038 | 0.25 0.13 0.067;
        # dpmpp_2m 0.051 0.016 0.0049 | 0.17 0.068 0.025
        assert 1.7 < err["ddim", 20][0] / err["ddim", 40][0] < 2.3
        assert err["dpmpp_2m", 20][0] / err["dpmpp_2m", 40][0] > 2.6
        assert err["ddim", 40][0] < 0.08 and err["dpmpp_2m", 40][0] < 0.03
        for solver in ("ddim", "dpmpp_2m"):
            assert err[solver, 40][1] < err[solver, 10][1] / 2.5
        assert err["ddim", 40][1] < 0.09


@pytest.mark.skipif(not (DIGITS_BASE / "checkpoints").is_dir(),
                    reason=f"trained digits DiT not found at {DIGITS_BASE} (python train/dit.py makes one; "
                           "or set DIFFTOOLS_EDIT_BASE)")
def test_inversion_reconstructs_digits_with_trained_base():
    from difftools.data import build_dataset
    from difftools.editing.attributes import images_and_labels

    base = load_base(DIGITS_BASE)
    net = EmbeddingDiT(base.model)
    mf = ModelFn(net, base.process, base.prediction)
    x, y = images_and_labels(build_dataset("digits", split="test", image_size=16), limit=16)
    rmse = []
    for n in (10, 20, 40):
        rec = regenerate(mf, invert(mf, x, steps=n, y=y), steps=n, y=y)
        rmse.append((rec - x).pow(2).mean().sqrt().item())
    # measured (scripts/edit_images.py --reconstruction, 64 images, ddim, true labels): 0.044 (10 steps),
    # 0.023 (25), 0.012 (50); pixels in [-1, 1]
    assert rmse[0] > rmse[1] > rmse[2]
    assert rmse[2] < 0.03 and rmse[0] < 0.1


def test_edit_with_null_conditioning_is_reconstruction_and_checks_depth():
    dit = tiny_dit()
    net = EmbeddingDiT(dit)
    mf = ModelFn(net, Flow(), "flow")
    x = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    g = guided_model_fn(net, Flow(), "flow", 7.0)
    null = net.null_embedding().expand(4, -1)
    # CFG with cond = uncond is the unguided model: the edit is invert + regenerate
    out, x_t = edit(mf, g, x, invert_cond={}, edit_cond={"y_embed": null}, steps=30, t_edit=0.6)
    assert (out - x).pow(2).mean().sqrt() < 0.02
    assert (x_t - x).pow(2).mean().sqrt() > 0.1  # it did move away from the data
    with pytest.raises(ValueError, match="t_edit"):
        edit(mf, g, x, invert_cond={}, edit_cond={"y_embed": null}, t_edit=1.5)


# ------------------------------------------------------------------ loss
def test_caso_loss_forms_and_non_finite():
    logits = torch.tensor([[0.0, 1.3], [0.0, -0.4], [0.0, 2.0]])
    target = torch.tensor([1, 0, 1])
    p1 = torch.sigmoid(logits[:, 1])
    ce, parts = caso_loss(logits, target)
    expected = -torch.log(torch.stack([p1[0], 1 - p1[1], p1[2]])).mean()
    assert torch.allclose(ce, expected, atol=1e-6)
    # the released trainer's (a - sigmoid score)^2 equals (1 - p_a)^2 of a two-class softmax
    mse, _ = caso_loss(logits, target, kind="prob_mse")
    assert torch.allclose(mse, (target.float() - p1).pow(2).mean(), atol=1e-6)
    x0_pred, x0_ref = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    full, parts = caso_loss(logits, target, x0_pred, x0_ref, lambda_rec=0.5)
    assert torch.allclose(full, ce + 0.5, atol=1e-6) and parts["rec"] == 1.0
    with pytest.raises(FloatingPointError):
        caso_loss(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown CASO loss"):
        caso_loss(logits, target, kind="l1")


# ------------------------------------------------------------------ training
def test_training_raises_target_probability_and_only_embeddings_change():
    dit, clf = tiny_dit(), Brightness()
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dit_before, clf_before = snapshot(dit), snapshot(clf)
    cfg = CasoConfig(max_steps=40, batch_size=16, log_every=0, ckpt_every=0)
    init = SemanticEmbeddings(["dark", "bright"], [0, 1], init=EmbeddingDiT(dit).null_embedding())
    p0 = one_step_probability(dit, Flow(), "flow", clf, images, init, cfg.guidance_scale, cfg.t_min,
                              cfg.t_max)
    res = train_embeddings(dit, Flow(), "flow", clf, images, ["dark", "bright"], [0, 1], cfg)
    p1 = one_step_probability(dit, Flow(), "flow", clf, images, res.embeddings, cfg.guidance_scale,
                              cfg.t_min, cfg.t_max)
    # measured: dark 0.82 -> 0.99, bright 0.18 -> 0.92
    assert p1[0] > p0[0] + 0.1 and p1[1] > p0[1] + 0.5
    assert same(dit_before, snapshot(dit)) and same(clf_before, snapshot(clf))
    assert not torch.equal(res.embeddings.weight[1], init.weight[1])
    assert all(not p.requires_grad for p in dit.parameters())


class _OneProcess:
    """The part of difftools.training.RunInfo that CasoObjective.on_start reads."""

    world_size = 1


@pytest.mark.parametrize("slot", ["vector", "label_row"])
def test_only_the_embeddings_receive_gradients(slot):
    dit, clf = tiny_dit(), Brightness()
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net = EmbeddingDiT(dit)
    emb = make_embeddings(slot, net.label_table(), net.null_class, ["dark", "bright"], [0, 1])
    objective = CasoObjective(emb, dit, Flow(), "flow", clf, images, CasoConfig(batch_size=8, lambda_rec=0.5))
    objective.on_start(_OneProcess(), None)
    loss, _ = objective(next(objective.batches(0, _OneProcess())), None)
    loss.backward()
    # what the engine hands to its optimizer: every parameter with requires_grad
    trainable = [n for n, p in objective.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in objective.named_parameters() if p.grad is not None]
    expected = ["model.weight"] if slot == "vector" else ["model.coef"]
    assert trainable == expected and with_grad == expected
    assert objective.model.vectors().shape == (2, 32)
    grad = dict(objective.named_parameters())[expected[0]].grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if slot == "label_row":  # the frozen table is a buffer: it never gets a gradient
        assert not objective.model.table.requires_grad
        assert torch.equal(objective.model.table, net.label_table())


def test_released_timestep_is_the_snr_matched_time_and_is_used_exactly():
    """The released trainer trains at DDPM step 401 of SD v1's scaled-linear schedule (SNR 0.7327);
    timestep="released" trains every step at the time of our process with that SNR."""
    t_flow = released_train_time(Flow())
    # alpha_bar_401 = 0.422882 -> SNR = 0.732746 -> flow t = 1 / (1 + sqrt(SNR)) (computed offline in float64)
    assert abs(t_flow - 0.5387913) < 1e-6
    t_vp = released_train_time(VP())
    snr_vp = (VP().alpha(t_vp) / VP().sigma(t_vp)).pow(2).item()
    assert abs(snr_vp - 0.7327465) < 1e-5
    dit, clf = tiny_dit(), Brightness()
    seen = []
    dit.t_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net = EmbeddingDiT(dit)
    emb = make_embeddings("vector", net.label_table(), net.null_class, ["dark", "bright"], [0, 1])
    cfg = CasoConfig(batch_size=8, timestep="released")
    objective = CasoObjective(emb, dit, Flow(), "flow", clf, images, cfg)
    objective.on_start(_OneProcess(), None)
    batches = objective.batches(0, _OneProcess())
    for _ in range(3):
        objective(next(batches), None)
    t = torch.cat(seen)
    assert t.numel() == 3 * 2 * 8  # 3 steps, CFG's cond + uncond halves, 8 images
    assert torch.equal(t, torch.full_like(t, t_flow))
    # the uniform default spreads over [t_min, t_max]
    seen.clear()
    objective = CasoObjective(emb, dit, Flow(), "flow", clf, images, CasoConfig(batch_size=64))
    objective.on_start(_OneProcess(), None)
    objective(next(objective.batches(0, _OneProcess())), None)
    t = torch.cat(seen)
    assert 0.3 <= t.min() < 0.35 and 0.65 < t.max() <= 0.7


def test_training_resumes_exactly(tmp_path):
    dit, clf = tiny_dit(hidden=16, depth=1), Brightness()
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(batch_size=8, log_every=0, ckpt_every=3, lambda_rec=0.3)
    names, targets = ["a", "b"], [0, 1]
    straight = train_embeddings(dit, Flow(), "flow", clf, images, names, targets,
                                CasoConfig(max_steps=6, **kw))
    run = tmp_path / "run"
    first = train_embeddings(dit, Flow(), "flow", clf, images, names, targets, CasoConfig(max_steps=3, **kw),
                             out_dir=run)
    assert first.step == 3 and (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    # the engine's layout: the embeddings are the model, the generator and history the objective state
    assert (run / "checkpoints" / "step_0000003" / "state" / "objective.safetensors").is_file()
    resumed = train_embeddings(dit, Flow(), "flow", clf, images, ["a", "b"], [0, 1],
                               CasoConfig(max_steps=6, **kw), out_dir=run)
    assert resumed.step == 6 and len(resumed.history) == 6
    assert torch.equal(resumed.embeddings.weight, straight.embeddings.weight)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    with pytest.raises(CheckpointError, match="cannot resume"):
        train_embeddings(dit, Flow(), "flow", clf, images, ["x", "y"], [0, 1], CasoConfig(max_steps=7, **kw),
                         out_dir=run)


# ------------------------------------------------------------------ I/O and errors
def test_embeddings_roundtrip_atomic_and_errors(tmp_path, monkeypatch):
    emb = SemanticEmbeddings(["thin", "thick"], [0, 1], dim=32)
    with torch.no_grad():
        emb.weight.normal_()
    path = save_embeddings(tmp_path / "e.safetensors", emb, {"base": "runs/x"})
    loaded, meta = load_embeddings(path, hidden_size=32)
    assert torch.equal(loaded.weight, emb.weight) and loaded.names == ["thin", "thick"]
    assert meta["base"] == "runs/x" and meta["targets"] == [0, 1]
    with pytest.raises(ValueError, match="32-dimensional"):
        load_embeddings(path, hidden_size=64)
    with pytest.raises(FileNotFoundError, match="train/edit.py"):
        load_embeddings(tmp_path / "missing.safetensors")
    # a failed write leaves the previous file intact and no temporary file behind
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_embeddings(path, SemanticEmbeddings(["a"], init=torch.ones(32)))
    monkeypatch.undo()
    assert torch.equal(load_embeddings(path)[0].weight, emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


def test_missing_inputs_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="train/dit.py"):
        load_base(tmp_path / "no_such_run")
    info = {"name": "digits", "channels": 1, "image_size": 16, "num_classes": 10}
    with pytest.raises(CheckpointError, match="train/classifier.py"):
        load_attribute_classifier(tmp_path / "no_clf", info)
    assert resolve_targets(["3"], None, [str(k) for k in range(10)]) == (["3"], [3])
    with pytest.raises(ValueError, match="not classes"):
        resolve_targets(["thick"], None, [str(k) for k in range(10)])
    with pytest.raises(ValueError, match="targets"):
        resolve_targets(["a"], [12], ["x", "y"])
    with pytest.raises(ValueError, match="t_min"):
        CasoConfig(t_min=0.8, t_max=0.2)
    with pytest.raises(ValueError, match="caso.slot 'token'.*vector"):
        CasoConfig(slot="token")
    with pytest.raises(ValueError, match="caso.timestep 'fixed'.*released"):
        CasoConfig(timestep="fixed")
    with pytest.raises(ValueError, match="splits are"):
        attribute_dataset("digits", split="validation", attribute="slant")


def test_caso_refuses_several_processes():
    class TwoProcesses:
        world_size = 2

    dit = tiny_dit()
    net = EmbeddingDiT(dit)
    emb = make_embeddings("vector", net.label_table(), net.null_class, ["a"], [0])
    objective = CasoObjective(emb, dit, Flow(), "flow", Brightness(), torch.zeros(2, 1, 8, 8), CasoConfig())
    with pytest.raises(RuntimeError, match="one process"):
        objective.on_start(TwoProcesses(), None)


def test_thickness_attribute_is_balanced_per_class():
    train = attribute_dataset("digits", split="train", image_size=16)
    test = attribute_dataset("digits", split="test", image_size=16)
    assert train.info.class_names == ("thin", "thick") and train.info.num_classes == 2
    for k in range(10):
        frac = train.labels[train.source_labels == k].float().mean().item()
        assert 0.4 < frac <= 0.5  # strictly above the median: at most half, ties go to "thin"
    # the label is "more ink than the class median of the TRAIN split"
    mass = ink_mass(test.images * 2 - 1)
    thick, thin = mass[test.labels == 1], mass[test.labels == 0]
    assert thick.mean() > thin.mean() + 0.05


# ------------------------------------------------------------------ recipe + script, end to end
def test_recipe_and_edit_script_end_to_end(tmp_path):
    """train/edit.py (Hydra) on a tiny saved DiT + attribute classifier, then scripts/edit_images.py."""
    from difftools.checkpoint import save_checkpoint
    from difftools.data.base import DatasetInfo
    from difftools.metrics.classifier import FitResult, save_classifier
    from difftools.models.classifier import Classifier

    dit = tiny_dit(size=16, hidden=16, depth=1, num_classes=10)
    info = DatasetInfo("digits", 1, 16, 10, tuple(str(k) for k in range(10)))
    save_checkpoint(tmp_path / "base" / "checkpoints" / "step_1", dit, kind="dit", process=Flow(),
                    prediction="flow", dataset_info=info)
    clf = Classifier(1, 16, 2, widths=(4, 8), depth=1).eval()
    with torch.no_grad():  # every image reads as "thick": the thin embedding has sources, thick none
        clf.head.bias.copy_(torch.tensor([0.0, 100.0]))
    save_classifier(tmp_path / "clf", clf, DatasetInfo("digits_thickness", 1, 16, 2, ("thin", "thick")),
                    FitResult(0.5, 0.0, 0, 0.0))
    run = tmp_path / "edit"
    cmd = [sys.executable, str(REPO / "train" / "edit.py"), f"base={tmp_path / 'base'}",
           f"classifier={tmp_path / 'clf'}", "caso.max_steps=3", "caso.batch_size=4", "data.limit=16",
           f"out={run}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["names"] == ["thin", "thick"] and summary["steps"] == 3
    emb, meta = load_embeddings(run / "embeddings.safetensors", hidden_size=16)
    assert meta["base"].startswith(str(tmp_path / "base"))
    assert meta["classifier"]["path"] == str(tmp_path / "clf")

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import edit_images
    finally:
        sys.path.pop(0)
    result = edit_images.main(["--embeddings", str(run / "embeddings.safetensors"), "--limit", "3",
                               "--steps", "3", "--guidance", "4", "--t-edit", "0.8",
                               "--grid", str(tmp_path / "grid.png"), "--json", str(tmp_path / "m.json")])
    kinds = [(r["embedding"], r["kind"]) for r in result["rows"]]
    assert kinds == [("thin", "caso"), ("thin", "null")] and result["skipped"] == ["thick"]
    assert all(r["n"] <= 3 and 0 <= r["success"] <= 1 and r["rmse"] >= 0 for r in result["rows"])
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert json.loads((tmp_path / "m.json").read_text())["rows"]


# ------------------------------------------------------------------ slots (issue 17)
def test_label_row_slot_is_a_new_table_row_in_the_span_and_equals_the_dits_own_path():
    dit = tiny_dit()
    net = EmbeddingDiT(dit)
    table = net.label_table()
    emb = make_embeddings("label_row", table, net.null_class, ["a", "b"], [0, 1])
    # starts at the null row, like the vector slot
    assert torch.equal(emb.vectors(), table[net.null_class].expand(2, -1))
    with torch.no_grad():
        emb.coef.copy_(torch.randn(2, table.shape[0]))
    assert torch.allclose(emb.vectors(), emb.coef @ table)
    # a new class row appended to the table, looked up by the DiT's own forward (its frozen
    # conditioning path) is exactly the same computation as the conditioning vector fed to EmbeddingDiT
    bigger = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                 num_classes=4)
    state = {k: v for k, v in dit.state_dict().items() if "embedding_table" not in k}
    bigger.load_state_dict(state, strict=False)
    row = emb.vectors()[1].detach()
    with torch.no_grad():  # rows 0-2: the classes, 3: the new row, 4: the null row
        bigger.y_embedder.embedding_table.weight.copy_(torch.cat([table[:3], row[None], table[3:]]))
    bigger.eval()
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    assert torch.equal(bigger(x, t, torch.full((5,), 3)), net(x, t, y_embed=row))


# ------------------------------------------------------------------ baselines (issue 17)
def test_mean_difference_baseline_is_the_stated_mean():
    from difftools.editing.baselines import (
        class_step,
        label_embeddings,
        mean_difference_direction,
        mean_difference_embeddings,
    )

    net = EmbeddingDiT(tiny_dit())
    table = net.label_table()
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    positive = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 0]).bool()
    # counts: positives 2x class 0, 1x class 1, 3x class 2 (of 6); negatives 2x0, 1x1, 1x2 (of 4)
    expected = (2 / 6 - 2 / 4) * table[0] + (1 / 6 - 1 / 4) * table[1] + (3 / 6 - 1 / 4) * table[2]
    d = mean_difference_direction(label_embeddings(net, labels), positive)
    assert torch.allclose(d, expected, atol=1e-6)
    rows, raw = mean_difference_embeddings(net, labels, positive, ["neg", "pos"], [0, 1])
    step = float((table[:3] - table[3]).norm(dim=1).mean())
    assert abs(class_step(net) - step) < 1e-6
    assert torch.allclose(rows.weight[1], table[3] + step * expected / expected.norm(), atol=1e-5)
    assert torch.allclose(rows.weight[0], table[3] - step * expected / expected.norm(), atol=1e-5)
    assert torch.equal(raw, d)
    # balanced inside every class: the label embeddings carry no direction at all
    balanced = torch.tensor([1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="exactly zero"):
        mean_difference_embeddings(net, torch.tensor([0, 0, 1, 1, 2, 2]), balanced.bool())
    with pytest.raises(ValueError, match="both"):
        mean_difference_direction(table[:3], torch.ones(3, dtype=torch.bool))


def test_edit_with_null_and_no_guidance_is_the_inversions_reconstruction():
    """Null embedding, no guidance (w = 1 and CFG with cond = uncond): the edit is regenerate(invert(x))
    with the plain model; its error against the source is the ODE solvers' discretisation error, which
    falls at first order with the steps (DDIM)."""
    from difftools.editing.baselines import ClassifierGuidedFn

    net = EmbeddingDiT(tiny_dit())
    mf = ModelFn(net, Flow(), "flow")
    x = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.8
    null = net.null_embedding().expand(6, -1)
    err = {}
    for n in (10, 20, 40):
        plain = regenerate(mf, invert(mf, x, steps=n), steps=n)
        for w in (1.0, 5.0):
            out, _ = edit(mf, guided_model_fn(net, Flow(), "flow", w), x, invert_cond={},
                          edit_cond={"y_embed": null}, steps=n, t_edit=1.0)
            assert torch.allclose(out, plain, atol=1e-5)
        # classifier guidance with scale 0 is the unguided model too
        out, _ = edit(mf, ClassifierGuidedFn(mf, Brightness(), 1, 0.0), x, invert_cond={}, edit_cond={},
                      steps=n, t_edit=1.0)
        assert torch.equal(out, plain)
        err[n] = (plain - x).pow(2).mean().sqrt().item()
    assert err[10] > err[20] > err[40] and err[10] / err[40] > 2.5 and err[40] < 0.02


def test_classifier_guidance_moves_the_estimate_along_the_log_prob_gradient():
    from difftools.editing.baselines import ClassifierGuidedFn

    net, clf = EmbeddingDiT(tiny_dit()), Brightness()
    mf = ModelFn(net, Flow(), "flow")
    x_t, t = torch.randn(4, 1, 8, 8), 0.6
    plain = mf.predict(x_t, t)
    guided = ClassifierGuidedFn(mf, clf, 1, 0.5).predict(x_t, t)
    # Brightness: log p(bright | x) = log sigmoid(2 s m), m = mean pixel; d/dx = 2 s (1 - p) / 64 per pixel
    m = plain.x0.mean((1, 2, 3))
    p = torch.sigmoid(2 * 10.0 * m)
    step = 0.5 * 2 * 10.0 * (1 - p) / 64
    assert torch.allclose(guided.x0 - plain.x0, step[:, None, None, None].expand_as(x_t), atol=1e-6)
    # eps stays consistent with x_t: x_t = alpha x0 + sigma eps
    assert torch.allclose((1 - t) * guided.x0 + t * guided.eps, x_t, atol=1e-5)


# ------------------------------------------------------------------ slant judge and measures (issue 17)
def test_slant_of_a_sheared_bar_and_fixed_halves():
    from difftools.editing.attributes import slant, slant_judge, split_halves

    img = -torch.ones(2, 1, 32, 32)
    for v in range(6, 26):  # a bar leaning right: 0.5 columns to the right per row going up
        u = round(16 + 0.5 * (16 - v))
        img[0, 0, v, u - 1:u + 2] = 1.0
    img[1] = img[0].flip(-1)  # its mirror image leans left
    s = slant(img)
    assert abs(s[0] - 0.5) < 0.05 and abs(s[1] + 0.5) < 0.05
    labels = torch.tensor([3, 3])
    assert slant_judge(img, labels, torch.zeros(10)).tolist() == [1, 0]
    assert slant(-torch.ones(1, 1, 32, 32)).item() == 0.0  # no ink: no slant, no NaN
    # a faint uniform background adds to mu_02 only: the plain measure shrinks toward 0, the
    # binarised one (pixels brighter than 1/2) does not see it
    hazy = torch.where(img > 0, img, torch.full_like(img, -0.6))  # background intensity 0.2
    assert 0 < slant(hazy)[0] < 0.3
    assert torch.allclose(slant(hazy, threshold=0.5), slant(img, threshold=0.5))
    assert abs(slant(img, threshold=0.5)[0] - s[0]) < 1e-6  # binary ink: the same as the plain measure
    a, b = split_halves(11)
    assert len(a) == 5 and len(b) == 6 and sorted(torch.cat([a, b]).tolist()) == list(range(11))
    assert torch.equal(split_halves(11)[0], a)  # fixed


def test_ssim_matches_the_direct_formula():
    from difftools.editing.measures import ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 13, 14, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 1, 13, 14, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # the definition, window by window (Gaussian 11x11, std 1.5; valid positions; data in [0, 1])
    k = torch.exp(-(torch.arange(11.0) - 5).pow(2) / (2 * 1.5 ** 2))
    win = (k[:, None] * k[None]) / (k.sum() ** 2)
    expected = []
    for i in range(2):
        a, b, vals = (x[i, 0].double() + 1) / 2, (y[i, 0].double() + 1) / 2, []
        for r in range(13 - 10):
            for c in range(14 - 10):
                pa, pb, w = a[r:r + 11, c:c + 11], b[r:r + 11, c:c + 11], win.double()
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                num = (2 * ma * mb + 1e-4) * (2 * cov + 9e-4)
                vals.append(num / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
        expected.append(torch.stack(vals).mean())
    assert torch.allclose(ssim(x, y).double(), torch.stack(expected), atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_frontier_and_selection_rule():
    from difftools.editing.sweep import pareto_front, select

    pts = [(0.9, 0.1), (0.8, 0.5), (0.7, 0.4), (0.5, 0.9), (0.9, 0.05)]
    assert pareto_front(pts) == [3, 1, 0]
    settings = [{"success": 0.8, "kept": 0.85, "ssim": 0.9}, {"success": 0.6, "kept": 0.95, "ssim": 0.6},
                {"success": 0.6, "kept": 0.92, "ssim": 0.75}, {"success": 0.3, "kept": 1.0, "ssim": 0.9}]
    assert select(settings, 0.9, 0.5) is settings[2]  # best success meeting both; tie -> higher ssim
    assert select(settings, 0.9, 0.8) is settings[3]
    assert select(settings, 0.99, 0.95) is None
