"""The arms experiment of docs/mcd.md: one teacher, one judge, equal-budget distillation arms, every
round evaluated; resumable across short invocations (``run(..., time_limit=540)`` as often as needed).

Layout of ``out``::

    teacher/     engine run of the masked-diffusion teacher (checkpoints/, metrics.jsonl: loss and
                 eval/val_nelbo, the teacher's curve)
    judge/       engine run of the autoregressive judge (eval/val_nll)
    arms/<arm>/seed<s>/round<k>/   engine run of each distillation round (difftools.discrete.distill)
    eval.json    one row per (model, round, sampler, steps, seed): gen-PPL, entropy, NFE, samples;
                 written atomically after each row, so a cut invocation loses at most one row
    summary.md, arms.png   table and plot (:func:`summarise`)

Each stage checks the time left before it starts a unit of work (a training run stops itself at the
limit with a checkpoint), so an invocation ends within about one evaluation row of ``time_limit``.
Sample seeds are shared between models (seed s samples with generator 1000 + s), so rows with the
same seed and step count are paired.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from difftools import checkpoint as ckpt_io
from difftools.data.text import CharText
from difftools.discrete.distill import distill
from difftools.discrete.judge import CausalLMObjective, score
from difftools.discrete.masked import MaskedDiffusion
from difftools.discrete.objectives import MaskedLMObjective, load_token_model, trainer_config
from difftools.discrete.sampling import SAMPLERS, sample
from difftools.models.token_transformer import TokenTransformer
from difftools.training import Trainer
from samplers.atomic import write_text_atomic

log = logging.getLogger("difftools.discrete")


@dataclass
class Arm:
    name: str
    pairs: str              #: trajectory | sdtt | data | independent | mdlm (the control)
    divergence: str = "reverse"


@dataclass
class ExperimentConfig:
    """Scale and budget of one experiment (``PRESETS`` holds the CPU and GPU ones)."""

    seq_len: int = 32
    val_fraction: float = 0.1
    data_root: str | None = None
    teacher: dict = field(default_factory=lambda: dict(dim=96, depth=3, heads=4))
    teacher_train: dict = field(default_factory=lambda: dict(batch_size=64, max_steps=1200, lr=1e-3,
                                                             warmup_steps=100))
    judge: dict = field(default_factory=lambda: dict(dim=96, depth=3, heads=4))
    judge_train: dict = field(default_factory=lambda: dict(batch_size=64, max_steps=600, lr=1e-3,
                                                           warmup_steps=100))
    base_steps: int = 64
    rounds: int = 4
    steps_per_round: int = 60
    distill_batch: int = 64
    distill_lr: float = 3e-4
    distill_warmup: int = 10
    substeps: int = 1
    teacher_mode: str = "refresh"
    arms: list[Arm] = field(default_factory=lambda: [
        Arm("coupled_reverse", "trajectory", "reverse"), Arm("coupled_forward", "trajectory", "forward"),
        Arm("sdtt", "sdtt", "forward"), Arm("mdlm_control", "mdlm", "forward"),
        Arm("data_reverse", "data", "reverse")])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    eval_steps: list[int] = field(default_factory=lambda: [4, 8, 16, 64])
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    round_samplers: list[str] | None = field(default_factory=lambda: ["deterministic"])
    #: ^ samplers of the rounds before the last (None: ``samplers``; the last round and the teacher use both)
    num_samples: int = 64
    eval_batch: int = 256
    trainer: dict = field(default_factory=lambda: dict(device="cpu", cpu_threads=1, log_every=50,
                                                       ckpt_every=250))

    @classmethod
    def from_dict(cls, d: dict) -> ExperimentConfig:
        d = dict(d)
        if "arms" in d:
            d["arms"] = [a if isinstance(a, Arm) else Arm(**a) for a in d["arms"]]
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ExperimentConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # 2 shared CPU cores, ~30 min of compute in all (docs/mcd.md, "CPU experiment")
    "cpu": ExperimentConfig(),
    # the GPU acceptance: a 10.8 M-parameter teacher, context 256, bf16 (docs/mcd.md, "GPU plan")
    "gpu": ExperimentConfig(
        seq_len=256,
        teacher=dict(dim=384, depth=6, heads=6, dropout=0.2),
        teacher_train=dict(batch_size=64, max_steps=12000, lr=1e-3, warmup_steps=500, lr_decay="cosine"),
        judge=dict(dim=384, depth=6, heads=6, dropout=0.2),
        judge_train=dict(batch_size=64, max_steps=5000, lr=1e-3, warmup_steps=200, lr_decay="cosine"),
        base_steps=64, rounds=4, steps_per_round=1000, distill_batch=64, distill_lr=1e-4, distill_warmup=100,
        arms=[Arm("coupled_reverse", "trajectory", "reverse"),
              Arm("coupled_forward", "trajectory", "forward"),
              Arm("sdtt", "sdtt", "forward"), Arm("mdlm_control", "mdlm", "forward")],
        eval_steps=[4, 8, 16, 32, 64, 128, 256], num_samples=512, eval_batch=512,
        trainer=dict(device="auto", log_every=100, ckpt_every=1000),
    ),
}


class _OutOfTime(Exception):
    """The experiment's time budget ran out mid-stage (caught by the runner, which saves and stops)."""


class _Budget:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def check(self) -> None:
        left = self.left()
        if left is not None and left <= 0:
            raise _OutOfTime


class Experiment:
    """Runs and resumes the experiment of ``cfg`` in ``out`` (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, out):
        self.cfg, self.out = cfg, Path(out)
        self.train_data = CharText(cfg.data_root, "train", cfg.seq_len, cfg.val_fraction)
        self.val_data = CharText(cfg.data_root, "val", cfg.seq_len, cfg.val_fraction)
        self.vocab = self.train_data.vocab_size
        self.process = MaskedDiffusion(self.vocab)
        self.info = {"name": "text/tinyshakespeare", "chars": "".join(self.train_data.chars),
                     "seq_len": cfg.seq_len}
        self.rows_file = self.out / "eval.json"
        self.rows = ckpt_io.read_json(self.rows_file) if self.rows_file.is_file() else {}

    # ------------------------------------------------------------------ stages
    def run(self, time_limit: float | None = None) -> bool:
        """Do what is left, within ``time_limit`` seconds; True when everything is done."""
        budget = _Budget(time_limit)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "experiment.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        try:
            teacher = self._train_base("teacher", budget)
            judge = self._train_base("judge", budget)
            if teacher is None or judge is None:
                return False
            if REFERENCE not in self.rows:  # what held-out text scores: summary.md's first line
                self._save_row(REFERENCE, {"model": REFERENCE, **reference(self.cfg, judge)})
            self._evaluate("teacher", 0, teacher, judge, budget)
            for arm in self.cfg.arms:
                for seed in self.cfg.seeds:
                    if not self._run_arm(arm, seed, teacher, judge, budget):
                        return False
        except _OutOfTime:
            return False
        summarise(self.out, self.cfg)
        return True

    def _train_base(self, which: str, budget: _Budget):
        """The teacher or the judge: trained (or resumed) in <out>/<which>; the model once done."""
        cfg = self.cfg
        run_dir = self.out / which
        budget.check()
        torch.manual_seed(0)
        causal = which == "judge"
        model = TokenTransformer(self.vocab, cfg.seq_len, causal=causal, **getattr(cfg, which))
        cls = CausalLMObjective if causal else MaskedLMObjective
        extra = {} if causal else {"process": self.process}
        objective = cls(model, batch_fn=self.train_data.random_batch, seed=0,
                        val_fn=lambda g: self.val_data.random_batch(64, g), dataset_info=self.info, **extra)
        options = {**cfg.trainer, **getattr(cfg, f"{which}_train")}
        options.update(time_limit=budget.left(), resume="auto", eval_every=options.get("ckpt_every", 0))
        result = Trainer(objective, trainer_config(**options), run_dir,
                         run_config={"experiment": asdict(cfg), "model": which}).train()
        if result.step < options["max_steps"]:
            return None
        return load_token_model(run_dir, device=_device(cfg))[0]

    def _run_arm(self, arm: Arm, seed: int, teacher, judge, budget: _Budget) -> bool:
        cfg = self.cfg
        budget.check()
        student = copy.deepcopy(teacher)

        def on_round(k, model, _result):
            last = k == cfg.rounds
            samplers = cfg.samplers if last or cfg.round_samplers is None else cfg.round_samplers
            self._evaluate(arm.name, k, model, judge, budget, seeds=[seed], samplers=samplers)

        results = distill(student, teacher, self.process, self.train_data.random_batch, pairs=arm.pairs,
                          divergence=arm.divergence, base_steps=cfg.base_steps, rounds=cfg.rounds,
                          steps_per_round=cfg.steps_per_round, batch_size=cfg.distill_batch,
                          lr=cfg.distill_lr,
                          warmup=cfg.distill_warmup, teacher_mode=cfg.teacher_mode, substeps=cfg.substeps,
                          out_dir=self.out / "arms" / arm.name / f"seed{seed}", seed=seed,
                          time_limit=budget.left(), trainer_options=dict(cfg.trainer),
                          run_config={"experiment": asdict(cfg), "arm": asdict(arm)}, dataset_info=self.info,
                          on_round=on_round)
        return len(results) == cfg.rounds and results[-1].finished

    def _evaluate(self, name: str, round_: int, model, judge, budget: _Budget, seeds=None,
                  samplers=None) -> None:
        """Rows (name, round, sampler, steps, seed) not yet in eval.json."""
        cfg = self.cfg
        model.eval()
        for seed in seeds if seeds is not None else cfg.seeds:
            for sampler in samplers if samplers is not None else cfg.samplers:
                for steps in cfg.eval_steps:
                    key = row_key(name, round_, sampler, steps, seed)
                    if key in self.rows:
                        continue
                    budget.check()
                    gen = torch.Generator().manual_seed(1000 + seed)
                    ids = torch.cat([sample(model, self.process, sampler,
                                            min(cfg.eval_batch, cfg.num_samples - i), cfg.seq_len, steps, gen)
                                     for i in range(0, cfg.num_samples, cfg.eval_batch)])
                    row = dict(model=name, round=round_, sampler=sampler, steps=steps, seed=seed, nfe=steps,
                               **score(judge, ids, self.vocab),
                               samples=[self.train_data.decode(s) for s in ids[:2]])
                    self._save_row(key, row)
                    log.info("%s round %d %s steps=%d seed=%d: gen-PPL %.3f entropy %.3f | %r", name, round_,
                             sampler, steps, seed, row["gen_ppl"], row["entropy"], row["samples"][0])


    def _save_row(self, key: str, row: dict) -> None:
        self.rows[key] = row
        write_text_atomic(self.rows_file, json.dumps(self.rows, indent=1))


REFERENCE = "reference_val_text"


def _device(cfg: ExperimentConfig) -> str:
    wanted = cfg.trainer.get("device", "auto")
    return "cuda" if wanted == "auto" and torch.cuda.is_available() else "cpu"


def row_key(name: str, round_: int, sampler: str, steps: int, seed: int) -> str:
    return f"{name}/round{round_}/{sampler}/steps{steps}/seed{seed}"


# ---------------------------------------------------------------------- summary
def pooled(rows: list[dict]) -> dict:
    """Rows of several seeds pooled: mean NLL / entropy weighted by n, their standard errors."""
    n = sum(r["n"] for r in rows)
    nll = sum(r["nll"] * r["n"] for r in rows) / n
    ent = sum(r["entropy"] * r["n"] for r in rows) / n
    se = lambda key: math.sqrt(sum((r[key] * r["n"]) ** 2 for r in rows)) / n  # noqa: E731
    return dict(n=n, nll=nll, nll_se=se("nll_se"), gen_ppl=math.exp(nll), entropy=ent,
                entropy_se=se("entropy_se"))


def reference(cfg: ExperimentConfig, judge) -> dict:
    """The judge's numbers on held-out text windows (what real text scores)."""
    val = CharText(cfg.data_root, "val", cfg.seq_len, cfg.val_fraction)
    ids = torch.stack([val[i] for i in range(min(len(val), cfg.num_samples * len(cfg.seeds)))])
    return score(judge, ids, val.vocab_size)


def summarise(out, cfg: ExperimentConfig) -> Path:
    """summary.md (table: every model, round, sampler and step count, seeds pooled) and arms.png
    (gen-PPL and entropy vs steps: the teacher and each arm's last round, both samplers)."""
    out = Path(out)
    rows = ckpt_io.read_json(out / "eval.json")
    ref = rows.pop(REFERENCE, None)
    if ref is None:  # an eval.json written before the reference row existed
        ref = reference(cfg, load_token_model(out / "judge")[0])
    groups: dict[tuple, list[dict]] = {}
    for r in rows.values():
        groups.setdefault((r["model"], r["round"], r["sampler"], r["steps"]), []).append(r)
    lines = [f"Reference: {ref['n']} held-out windows of {cfg.seq_len} characters score gen-PPL "
             f"{ref['gen_ppl']:.3f} (NLL {ref['nll']:.4f} ± {ref['nll_se']:.4f}), "
             f"entropy {ref['entropy']:.3f}.",
             "", "| model | round | sampler | steps | n | gen-PPL | NLL ± se | entropy ± se |",
             "|---|---|---|---|---|---|---|---|"]
    order = {a.name: i + 1 for i, a in enumerate(cfg.arms)}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 0), k[1], k[2], k[3])):
        p = pooled(groups[key])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {p['n']} | {p['gen_ppl']:.3f} | "
                     f"{p['nll']:.4f} ± {p['nll_se']:.4f} | {p['entropy']:.3f} ± {p['entropy_se']:.3f} |")
    summary = out / "summary.md"
    write_text_atomic(summary, "\n".join(lines) + "\n")
    _plot(groups, cfg, ref, out / "arms.png")
    return summary


def _plot(groups, cfg: ExperimentConfig, ref: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [("teacher", 0)] + [(a.name, cfg.rounds) for a in cfg.arms]
    for (name, rnd), color in zip(curves, plt.cm.tab10.colors, strict=False):
        for sampler, style in (("deterministic", "-"), ("ancestral", ":")):
            pts = [(s, pooled(groups[(name, rnd, sampler, s)])) for s in cfg.eval_steps
                   if (name, rnd, sampler, s) in groups]
            if not pts:
                continue
            steps = [s for s, _ in pts]
            label = f"{name}" + (f" (round {rnd})" if rnd else "") if sampler == "deterministic" else None
            axes[0].errorbar(steps, [p["gen_ppl"] for _, p in pts],
                             yerr=[p["gen_ppl"] * p["nll_se"] for _, p in pts], ls=style, color=color,
                             marker="o", ms=3, capsize=2, label=label)
            axes[1].errorbar(steps, [p["entropy"] for _, p in pts], yerr=[p["entropy_se"] for _, p in pts],
                             ls=style, color=color, marker="o", ms=3, capsize=2)
    labels = ((axes[0], "gen_ppl", "gen-PPL (judge) ↓"), (axes[1], "entropy", "per-sample entropy"))
    for ax, key, name in labels:
        ax.axhline(ref[key], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps (NFE)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("solid: deterministic sampler, dotted: ancestral; dashed: held-out text", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
