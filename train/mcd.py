"""Masked diffusion teacher and Masked Consistency Distillation (arXiv 2602.00792) on Tiny Shakespeare.

``python train/mcd.py stage=teacher`` then ``python train/mcd.py stage=distill teacher=<teacher.pt>``
(config: conf/mcd.yaml; docs/mcd.md). Each stage ends by sampling ``eval.num_samples`` sequences per
step count and scoring them with a held-out-free character 4-gram fit on the train split (per-char NLL,
a weak proxy of generative perplexity) plus their unigram entropy; results go to <run dir>/metrics.json.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from statistics import mean

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.mcd")
STAGES = ("teacher", "distill", "eval")


def evaluate(models: dict, process, data, cfg, run_dir: Path) -> dict:
    from difftools.discrete.masked import ancestral_sample
    from difftools.discrete.ngram import CharNGram, unigram_entropy

    ngram = CharNGram(data.ids, data.vocab_size, order=cfg.eval.ngram_order)
    results = {}
    for name, (model, steps_list) in models.items():
        for steps in steps_list:
            gen = torch.Generator().manual_seed(cfg.eval.seed)
            ids, nfe = ancestral_sample(model, process, cfg.eval.num_samples, data.seq_len, steps, gen)
            per_seq = ngram.nll_per_sequence(ids)  # standard error over sequences, not characters
            row = dict(
                nfe=nfe,
                n=cfg.eval.num_samples,
                ngram_nll=per_seq.mean().item(),
                ngram_nll_se=(per_seq.std() / len(per_seq) ** 0.5).item(),
                unigram_entropy=unigram_entropy(ids, data.vocab_size),
                samples=[data.decode(s) for s in ids[: cfg.eval.show]],
            )
            results[f"{name}@{steps}"] = row
            log.info(
                "%s steps=%d nfe=%d ngram_nll=%.4f H1=%.3f | %r",
                name,
                steps,
                nfe,
                row["ngram_nll"],
                row["unigram_entropy"],
                row["samples"][0],
            )
    val_ids = data.val_ids[: cfg.eval.num_samples * data.seq_len].reshape(-1, data.seq_len)
    results["reference_val_text"] = dict(
        n=val_ids.shape[0],
        ngram_nll=ngram.nll(val_ids),
        unigram_entropy=unigram_entropy(val_ids, data.vocab_size),
    )
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def load_model(path):
    """A TokenTransformer from a teacher.pt / round<k>.pt state file (eval mode)."""
    from difftools.discrete.model import TokenTransformer
    from difftools.discrete.trainer import load_state

    state = load_state(path)
    model = TokenTransformer(**state["config"])
    model.load_state_dict(state["model"])
    return model.eval()


@hydra.main(version_base="1.3", config_path="../conf", config_name="mcd")
def main(cfg: DictConfig) -> None:
    from difftools.data.text import CharText
    from difftools.discrete.masked import MaskedDiffusion
    from difftools.discrete.model import TokenTransformer
    from difftools.discrete.trainer import fit

    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {STAGES}")
    torch.set_num_threads(cfg.threads)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    data = CharText(cfg.data.root, "train", cfg.data.seq_len, cfg.data.val_fraction)
    data.val_ids = CharText(cfg.data.root, "val", cfg.data.seq_len, cfg.data.val_fraction).ids
    process = MaskedDiffusion(data.vocab_size, cfg.schedule)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    if cfg.stage == "teacher":
        torch.manual_seed(cfg.seed)
        model = TokenTransformer(data.vocab_size, cfg.data.seq_len, **cfg.model)
        log.info("teacher: %d parameters", sum(p.numel() for p in model.parameters()))

        def loss_fn(m, gen):
            return process.training_loss(m, data.random_batch(cfg.train.batch_size, gen), gen)

        history = fit(
            model,
            loss_fn,
            cfg.train.steps,
            cfg.train.lr,
            cfg.train.warmup,
            run_dir / "teacher.pt",
            cfg.train.save_every,
            cfg.seed,
            cfg.train.time_limit,
            log_every=250,
            log=log.info,
        )
        log.info("teacher: %d steps, last-500 mean loss %.4f", len(history), mean(history[-500:]))
        evaluate({"teacher": (model, list(cfg.eval.teacher_steps))}, process, data, cfg, run_dir)
        return

    from difftools.discrete.distill import distill

    if cfg.teacher is None:
        raise ValueError(
            f"stage={cfg.stage} needs teacher=<path of a teacher.pt> (make one with stage=teacher)"
        )
    teacher = load_model(cfg.teacher)
    if cfg.stage == "eval":
        models = {"teacher": (teacher, sorted({*cfg.eval.teacher_steps, *cfg.eval.student_steps}))}
        for name, path in (cfg.eval.students or {}).items():
            models[f"student_{name}"] = (load_model(path), list(cfg.eval.student_steps))
        evaluate(models, process, data, cfg, run_dir)
        return
    student = copy.deepcopy(teacher)
    histories = distill(
        student,
        teacher,
        process,
        lambda b, g: data.random_batch(b, g),
        coupling=cfg.distill.coupling,
        base_steps=cfg.distill.base_steps,
        rounds=cfg.distill.rounds,
        steps_per_round=cfg.distill.steps_per_round,
        batch_size=cfg.distill.batch_size,
        lr=cfg.distill.lr,
        teacher_mode=cfg.distill.teacher_mode,
        ckpt_dir=run_dir,
        seed=cfg.seed,
        time_limit_per_round=cfg.distill.time_limit_per_round,
        log=log.info,
    )
    for k, h in enumerate(histories, 1):
        log.info("round %d: loss first-50 %.4f last-50 %.4f", k, mean(h[:50]), mean(h[-50:]))
    evaluate(
        {
            f"student_{cfg.distill.coupling}": (student, list(cfg.eval.student_steps)),
            "teacher": (teacher, list(cfg.eval.student_steps)),
        },
        process,
        data,
        cfg,
        run_dir,
    )


if __name__ == "__main__":
    main()
