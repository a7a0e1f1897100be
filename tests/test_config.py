"""Typed configuration errors (difftools/config.py): the validator's rules, and the bad values of
issue 11 through the real CLIs (train/dit.py, scripts/sample.py), which must fail before any work
with a message naming the key, the value and the expected type."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import OmegaConf

from difftools.config import ConfigError, check_node, check_value, from_mapping, signature_schema
from difftools.training import TrainerConfig

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ validator
def _error(key, value, annotation, choices=None) -> str:
    with pytest.raises(ConfigError) as info:
        check_value(key, value, annotation, choices)
    return str(info.value)


def test_int_accepts_whole_numbers_only():
    assert check_value("n", 3, int) == 3
    out = check_value("n", 4.0, int)
    assert out == 4 and type(out) is int  # 4.0 from a YAML "4.0" is still a step count
    assert _error("t.max_steps", 2.5, int) == (
        "t.max_steps=2.5 is a float with a fraction; expected an integer")
    assert _error("t.max_steps", "abc", int) == "t.max_steps='abc' is a str; expected an integer"
    assert _error("t.max_steps", "5", int) == "t.max_steps='5' is a str; expected an integer"
    assert _error("t.max_steps", True, int) == "t.max_steps=True is a bool; expected an integer"


def test_float_accepts_ints_and_rejects_strings_and_bools():
    out = check_value("lr", 1, float)
    assert out == 1.0 and type(out) is float
    assert check_value("lr", 1e-4, float) == 1e-4
    assert _error("t.lr", "fast", float) == "t.lr='fast' is a str; expected a number"
    assert _error("t.lr", False, float) == "t.lr=False is a bool; expected a number"


def test_bool_accepts_only_true_and_false():
    assert check_value("p", True, bool) is True and check_value("p", False, bool) is False
    assert _error("t.progress", "maybe", bool) == "t.progress='maybe' is a str; expected true or false"
    assert _error("t.progress", 1, bool) == "t.progress=1 is an int; expected true or false"
    assert _error("t.progress", "true", bool).endswith("expected true or false")


def test_str_optional_path_and_literal():
    assert check_value("s", "x", str) == "x"
    assert _error("s", 3, str) == "s=3 is an int; expected a string"
    assert check_value("r", None, str | None) is None and check_value("r", "auto", str | None) == "auto"
    assert _error("t.cpu_threads", "two", int | None) == (
        "t.cpu_threads='two' is a str; expected an integer or null")
    assert check_value("p", "a/b", Path) == Path("a/b")
    assert _error("p", 1.5, str | Path | None).endswith("expected a string or a path or null")
    assert check_value("m", "bf16", Literal["bf16", "no"]) == "bf16"
    assert _error("m", "fp16", Literal["bf16", "no"]) == "m='fp16' is a str; expected one of 'bf16', 'no'"
    assert _error("k", True, Literal[1, 2]) == "k=True is a bool; expected one of 1, 2"  # True == 1, yet


def test_sequences_check_length_and_every_item_by_index():
    assert check_value("b", [0.9, 1], tuple[float, float]) == (0.9, 1.0)
    assert _error("t.betas", [0.9], tuple[float, float]) == (
        "t.betas=[0.9] is a list of 1 item; expected a list of 2 numbers")
    assert _error("t.betas", [0.9, "x"], tuple[float, float]) == "t.betas[1]='x' is a str; expected a number"
    assert _error("t.betas", "0.9,0.99", tuple[float, float]).startswith("t.betas='0.9,0.99' is a str")
    assert check_value("w", (4, 2, 1), tuple[int, ...]) == (4, 2, 1)
    assert check_value("w", [4, 2.0], list[int]) == [4, 2]
    assert _error("a.widths", [4, 2.5], list[int] | None) == (
        "a.widths[1]=2.5 is a float with a fraction; expected an integer")


def test_choices_are_checked_after_the_type():
    assert check_value("d", "cosine", str, ("constant", "cosine")) == "cosine"
    assert _error("t.lr_decay", "linear", str, ("constant", "cosine")) == (
        "t.lr_decay='linear' is not a valid choice; expected one of 'constant', 'cosine'")
    assert _error("t.lr_decay", 1, str, ("constant", "cosine")) == "t.lr_decay=1 is an int; expected a string"


def test_check_node_nested_schemas_unknown_keys_and_dotted_choices():
    schema = {"steps": int, "save": {"png": bool, "grid_size": int}}
    assert check_node({"steps": 3, "save": {"png": True}}, schema) == {"steps": 3, "save": {"png": True}}
    with pytest.raises(ConfigError, match=re.escape("save.grid_size='ten' is a str; expected an integer")):
        check_node({"save": {"grid_size": "ten"}}, schema)
    with pytest.raises(ConfigError, match=re.escape("unknown run option(s) ['stepz']; valid: ['save', ")):
        check_node({"stepz": 3}, schema, node="run")
    assert check_node({"stepz": 3}, schema, allow_unknown=True) == {"stepz": 3}
    with pytest.raises(ConfigError, match=re.escape("loss.align.features='dec' is not a valid choice")):
        check_node({"align": {"features": "dec"}}, {"align": {"features": str}}, node="loss",
                   choices={"align.features": ("latent", "encoder")})
    with pytest.raises(ConfigError, match=re.escape("save=3 is an int; expected a mapping")):
        check_node({"save": 3}, schema)
    # OmegaConf containers are Mapping / Sequence instances: no conversion needed before checking
    node = OmegaConf.create({"steps": 3, "save": {"png": False, "grid_size": 4}})
    assert check_node(node, schema) == {"steps": 3, "save": {"png": False, "grid_size": 4}}


@dataclass
class _Opts:
    size: int = 1
    scale: float = 1.0
    mode: Literal["a", "b"] = "a"
    betas: tuple[float, float] = (0.9, 0.99)
    threads: int | None = None


def test_from_mapping_builds_the_dataclass_with_converted_values():
    opts = from_mapping(_Opts, {"size": 2.0, "scale": 3, "betas": [0.5, 1], "threads": None}, node="x")
    assert opts == _Opts(size=2, scale=3.0, mode="a", betas=(0.5, 1.0), threads=None)
    assert type(opts.size) is int and type(opts.scale) is float and type(opts.betas) is tuple
    with pytest.raises(ConfigError, match=re.escape("x.mode='c' is a str; expected one of 'a', 'b'")):
        from_mapping(_Opts, {"mode": "c"}, node="x")
    with pytest.raises(ConfigError, match=re.escape("unknown x option(s) ['sise']")):
        from_mapping(_Opts, {"sise": 2}, node="x")
    with pytest.raises(TypeError, match="needs a dataclass"):
        from_mapping(dict, {}, node="x")


def test_signature_schema_reads_typed_keywords():
    def fn(a, b: int, c: float = 1.0, *args, d: str | None = None, **kw):
        return a

    schema = signature_schema(fn, skip=("a",))
    assert set(schema) == {"b", "c", "d"} and schema["b"] is int and schema["c"] is float
    assert check_value("d", None, schema["d"]) is None


def test_trainer_config_from_dict():
    yaml = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "trainer" / "default.yaml"))
    yaml["seed"] = 0  # ${seed} is the top file's
    cfg = TrainerConfig.from_dict(yaml)
    assert cfg.betas == (0.9, 0.999) and cfg.lr_decay == "cosine" and cfg.max_steps == 1000
    assert TrainerConfig.from_dict({}) == TrainerConfig()
    for key, value, message in [
        ("max_steps", "abc", "trainer.max_steps='abc' is a str; expected an integer"),
        ("mixed_precision", "fp8", "trainer.mixed_precision='fp8' is not a valid choice"),
        ("device", "cuda", "trainer.device='cuda' is not a valid choice; expected one of 'auto', 'cpu'"),
        ("sample_solver", "dpm", "trainer.sample_solver='dpm' is not a valid choice; expected one of 'ddim'"),
        ("bogus", 1, "unknown trainer option(s) ['bogus']"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainerConfig.from_dict({key: value})
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError keep working


def test_loss_node_types():
    from difftools.losses import check_loss_node

    node = {"prediction": "v", "t_min": 0, "t_mean": None,
            "align": {"weight": 1, "depth": 2.0, "widths": [8]}}
    assert check_loss_node(node) == {"prediction": "v", "t_min": 0.0, "t_mean": None,
                                     "align": {"weight": 1.0, "depth": 2, "widths": [8]}}
    with pytest.raises(ConfigError, match=re.escape("loss.prediction='velocity' is not a valid choice")):
        check_loss_node({"prediction": "velocity"})
    with pytest.raises(ConfigError, match=re.escape("loss.align.weight='on' is a str; expected a number")):
        check_loss_node({"align": {"weight": "on"}})


def test_sample_schema_covers_every_key_of_sample_yaml():
    """A key added to conf/sample.yaml without a type in SAMPLE_SCHEMA would go unchecked."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_script_cfg", REPO / "scripts" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.pop("hydra")

    def keys(node, schema, prefix=""):
        for k, v in node.items():
            assert k in schema, f"conf/sample.yaml key {prefix}{k} has no type in SAMPLE_SCHEMA"
            if isinstance(schema[k], dict):
                keys(v, schema[k], f"{prefix}{k}.")

    keys(OmegaConf.to_container(cfg), mod.SAMPLE_SCHEMA)
    mod.check_config(cfg)  # the shipped defaults pass


def _dit_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_dit_cfg", REPO / "train" / "dit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dit_check_config_covers_loss_and_eval_nodes():
    from hydra import compose, initialize_config_dir

    mod = _dit_module()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for groups in ([], ["trainer=gpu", "process=edm"], ["process=vp", "loss.align.weight=1.0"]):
            assert isinstance(mod.check_config(compose("dit", overrides=groups)), TrainerConfig)
        for override, message in [
            ("loss.t_min=abc", "loss.t_min='abc' is a str; expected a number"),
            ("loss.align.depth=1.5", "loss.align.depth=1.5 is a float with a fraction; expected an integer"),
            ("eval.num_samples=many", "eval.num_samples='many' is a str; expected an integer"),
            ("eval.enabled=yes please", "eval.enabled='yes please' is a str; expected true or false"),
        ]:
            with pytest.raises(ConfigError, match=re.escape(message)):
                mod.check_config(compose("dit", overrides=[override]))


# ------------------------------------------------------------------------------------ CLIs
# The bad values of issue 11 as a user types them, and what the last line of stderr must say.
# Each must exit 2 within seconds, before building data or a model.
CLI_CASES = [
    (["train/dit.py", "trainer.max_steps=abc"],
     "error: trainer.max_steps='abc' is a str; expected an integer"),
    (["train/dit.py", "trainer.batch_size=sixty"],
     "error: trainer.batch_size='sixty' is a str; expected an integer"),
    (["train/dit.py", "trainer.lr=fast"], "error: trainer.lr='fast' is a str; expected a number"),
    (["train/dit.py", "trainer.max_steps=2.5"],
     "error: trainer.max_steps=2.5 is a float with a fraction; expected an integer"),
    (["train/dit.py", "trainer.progress=maybe"],
     "error: trainer.progress='maybe' is a str; expected true or false"),
    (["scripts/sample.py", "ckpt=/nonexistent", "metrics.features=classifier"],
     "error: metrics.features='classifier' is a str; expected a list of strings"),
]


def test_bad_values_through_the_real_cli_fail_fast_naming_key_value_and_type(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = []
    for i, (argv, _) in enumerate(CLI_CASES):  # all at once: each is mostly interpreter start-up
        run_dir = tmp_path / f"run{i}"
        cmd = [sys.executable, str(REPO / argv[0]), *argv[1:], f"hydra.run.dir={run_dir}"]
        procs.append((run_dir, subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for (argv, message), (run_dir, proc) in zip(CLI_CASES, procs, strict=True):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, (argv, err[-2000:])
        assert err.strip().splitlines()[-1] == message, (argv, err[-2000:])
        assert not (run_dir / "checkpoints").exists()  # nothing was trained
