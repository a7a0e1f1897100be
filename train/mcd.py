"""Masked diffusion teacher, autoregressive judge and Masked Consistency Distillation (arXiv 2602.00792)
on character-level Tiny Shakespeare, on the training engine.

    python train/mcd.py stage=teacher                                     # <run>/checkpoints/step_*
    python train/mcd.py stage=judge                                       # the autoregressive judge
    python train/mcd.py stage=distill teacher=<teacher run> judge=<judge run> distill.pairs=trajectory
    python train/mcd.py stage=eval teacher=<teacher run> judge=<judge run> +eval.students.x=<run>/round4

Config: conf/mcd.yaml; docs/mcd.md. Every stage resumes when re-run with the same
``hydra.run.dir`` (the engine's checkpoints; finished distillation rounds are not redone). Samples
are scored with the judge (generative perplexity and per-sample entropy,
difftools.discrete.judge) when ``judge=`` is given; results go to <run>/eval.json.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.mcd")
STAGES = ("teacher", "judge", "distill", "eval")


def evaluate(models: dict, process, data, judge, cfg, run_dir: Path) -> dict:
    """Sample every (model, steps) with each of ``eval.samplers``; score with the judge if any."""
    from difftools.discrete.judge import sample_entropy, score
    from difftools.discrete.sampling import sample

    results = {}
    for name, (model, steps_list) in models.items():
        model.eval()
        for sampler in cfg.eval.samplers:
            for steps in steps_list:
                gen = torch.Generator().manual_seed(cfg.eval.seed)
                ids = sample(model, process, sampler, cfg.eval.num_samples, data.seq_len, steps, gen)
                if judge is not None:
                    row = score(judge, ids, data.vocab_size)
                else:
                    row = {"entropy": sample_entropy(ids, data.vocab_size).mean().item(), "n": len(ids)}
                row.update(nfe=steps, samples=[data.decode(s) for s in ids[: cfg.eval.show]])
                results[f"{name}/{sampler}@{steps}"] = row
                log.info("%s %s steps=%d gen-PPL %s entropy %.3f | %r", name, sampler, steps,
                         f"{row['gen_ppl']:.3f}" if "gen_ppl" in row else "- (no judge)", row["entropy"],
                         row["samples"][0] if row["samples"] else "")
    if judge is not None:
        val = data.val_ids[: cfg.eval.num_samples * data.seq_len].reshape(-1, data.seq_len)
        results["reference_val_text"] = score(judge, val, data.vocab_size)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    return results


def engine_options(cfg: DictConfig, node) -> dict:
    """TrainerConfig options shared by the stages (device, precision, threads, logging)."""
    return dict(device=node.device, mixed_precision=node.mixed_precision, cpu_threads=cfg.threads,
                log_every=node.log_every)


def check_stage(cfg: DictConfig) -> None:
    """Refuse a stage / key mistake before anything is built (the message names the key)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {STAGES}")
    if cfg.stage in ("distill", "eval") and cfg.teacher is None:
        raise ValueError(f"stage={cfg.stage} needs teacher=<run directory of a stage=teacher run>")
    from difftools.discrete.distill import check_options

    d = cfg.distill
    check_options(d.pairs, d.divergence, d.teacher_mode, d.substeps)


@hydra.main(version_base="1.3", config_path="../conf", config_name="mcd")
def main(cfg: DictConfig) -> None:
    from difftools.data.text import CharText
    from difftools.discrete.distill import distill
    from difftools.discrete.judge import CausalLMObjective
    from difftools.discrete.masked import MaskedDiffusion
    from difftools.discrete.objectives import MaskedLMObjective, load_token_model, trainer_config
    from difftools.models.token_transformer import TokenTransformer
    from difftools.training import Trainer

    try:
        check_stage(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(cfg.threads)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    data = CharText(cfg.data.root, "train", cfg.data.seq_len, cfg.data.val_fraction)
    val = CharText(cfg.data.root, "val", cfg.data.seq_len, cfg.data.val_fraction)
    data.val_ids = val.ids
    info = {"name": "text/tinyshakespeare", "chars": "".join(data.chars), "seq_len": cfg.data.seq_len}
    process = MaskedDiffusion(data.vocab_size, cfg.schedule)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    device = "cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else "cpu"
    judge = load_token_model(cfg.judge, device=device)[0] if cfg.judge is not None else None

    if cfg.stage in ("teacher", "judge"):
        causal = cfg.stage == "judge"
        torch.manual_seed(cfg.seed)  # the same initial weights on a resumed run (they are reloaded anyway)
        model = TokenTransformer(data.vocab_size, cfg.data.seq_len, causal=causal, **cfg.model)
        log.info("%s: %d parameters", cfg.stage, sum(p.numel() for p in model.parameters()))
        cls = CausalLMObjective if causal else MaskedLMObjective
        extra = {} if causal else {"process": process}
        objective = cls(model, batch_fn=data.random_batch, seed=cfg.seed,
                        val_fn=lambda g: val.random_batch(cfg.train.batch_size, g), dataset_info=info,
                        **extra)
        t = cfg.train
        options = dict(batch_size=t.batch_size, max_steps=t.steps, lr=t.lr, warmup_steps=t.warmup,
                       time_limit=t.time_limit, ckpt_every=t.save_every, eval_every=t.save_every,
                       resume="auto", seed=cfg.seed, **engine_options(cfg, t))
        result = Trainer(objective, trainer_config(**options), run_dir, run_config=run_config).train()
        log.info("%s: step %d (%s), final loss %.4f, checkpoint %s", cfg.stage, result.step,
                 result.stopped_by, result.final_loss, result.checkpoint)
        if not causal:
            evaluate({"teacher": (model, list(cfg.eval.teacher_steps))}, process, data, judge, cfg, run_dir)
        return

    teacher = load_token_model(cfg.teacher, device=device)[0]
    if cfg.stage == "eval":
        models = {"teacher": (teacher, sorted({*cfg.eval.teacher_steps, *cfg.eval.student_steps}))}
        for name, path in (cfg.eval.students or {}).items():
            student = load_token_model(path, device=device)[0]
            models[f"student_{name}"] = (student, list(cfg.eval.student_steps))
        evaluate(models, process, data, judge, cfg, run_dir)
        return
    d = cfg.distill
    student = copy.deepcopy(teacher)
    results = distill(student, teacher, process, data.random_batch, pairs=d.pairs, divergence=d.divergence,
                      base_steps=d.base_steps, rounds=d.rounds, steps_per_round=d.steps_per_round,
                      batch_size=d.batch_size, lr=d.lr, warmup=d.warmup, teacher_mode=d.teacher_mode,
                      substeps=d.substeps, out_dir=run_dir, seed=cfg.seed, time_limit=d.time_limit,
                      trainer_options=dict(ckpt_every=d.save_every, **engine_options(cfg, cfg.train)),
                      run_config=run_config, dataset_info=info)
    for r in results:
        if r.losses:
            n = min(50, len(r.losses))
            log.info("round %d (dt %.4f, %d steps): loss first-%d %.4f last-%d %.4f", r.round, r.dt,
                     r.step, n, sum(r.losses[:n]) / n, n, sum(r.losses[-n:]) / n)
    if len(results) < d.rounds or not results[-1].finished:
        log.info("distill: stopped at distill.time_limit; re-run with hydra.run.dir=%s to continue", run_dir)
        return
    evaluate({f"student_{d.pairs}_{d.divergence}": (student, list(cfg.eval.student_steps)),
              "teacher": (teacher, list(cfg.eval.student_steps))}, process, data, judge, cfg, run_dir)


if __name__ == "__main__":
    main()
