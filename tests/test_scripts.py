"""Every command the README and docs/*.md show (``python scripts/<name>.py ...``) still parses with the
script as it is now: argparse scripts through their ``parse_args(argv)``, scripts/sample.py (Hydra)
by composing conf/sample.yaml with the command's overrides and checking the result's types. A renamed
or removed option, or a new required one, fails here naming the doc file and line."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:python3?|accelerate launch(?: --\S+ \S+)*) (scripts/\w+\.py)\b(.*)")
HYDRA_SCRIPTS = {"scripts/sample.py": "sample"}


def normalise(rest: str) -> list[str]:
    """A documented command line as argv: up to its closing backtick, a shell ``;``, ``&&``, ``||``,
    pipe or redirection, or a ``# comment``; a usage synopsis made concrete: ``<placeholder>`` -> one
    word, ``[--opt v]`` -> ``--opt v``, ``a|b`` -> ``a``, a shell variable (``$OUT``, a loop's ``$s``)
    -> ``1``."""
    rest = re.split(r"\s#|;|\s&&|\s\|\|?\s|\s\d?>", rest.split("`")[0])[0]
    rest = re.sub(r"<[^>]*>", "PLACEHOLDER", rest)
    rest = re.sub(r"\[(--[^\]]*)\]", r"\1", rest)
    rest = re.sub(r"\$\w+", "1", rest)
    return [word.split("|")[0] for word in shlex.split(rest)]


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where: "file:line", script, argv) for every documented command; continuation lines
    (a trailing backslash) joined."""
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            for m in COMMAND.finditer(line):
                found.append((f"{doc.relative_to(REPO)}:{start + 1}", m.group(1), normalise(m.group(2))))
    return found


def load_script(rel: str):
    path = REPO / rel
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_script():
    """The pattern finds the commands (a changed doc format would otherwise pass silently)."""
    scripts = {script for _, script, _ in COMMANDS}
    names = ("sample", "fid", "search_schedule", "sampler_quality", "guidance_sweep", "align_experiment",
             "edit_images", "bench_train")
    expected = {f"scripts/{name}.py" for name in names}
    assert len(COMMANDS) >= 30 and expected <= scripts, scripts


@pytest.mark.parametrize("script", sorted({script for _, script, _ in COMMANDS}))
def test_documented_commands_parse(script):
    commands = [(where, argv) for where, s, argv in COMMANDS if s == script]
    mod = load_script(script)
    for where, argv in commands:
        if script in HYDRA_SCRIPTS:
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose(HYDRA_SCRIPTS[script], overrides=argv)
            mod.check_config(cfg)
            continue
        try:
            mod.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"{where}: `python {script} {shlex.join(argv)}` no longer parses (exit {err.code})")


def test_a_command_ends_at_shell_operators():
    """docs/gpu_runbook.md chains commands (`&& tar ...`, `|| exit 1`, `> log 2>&1`): only the script's own
    arguments are parsed."""
    assert normalise(" --n 5 --out $OUT/x && tar -czf $OUT/x.tgz -C runs x") == ["--n", "5", "--out", "1/x"]
    assert normalise(" --cuda --paths a b || exit 1") == ["--cuda", "--paths", "a", "b"]
    assert normalise(" --steps 3 > runs/log.txt 2>&1; tar") == ["--steps", "3"]
    assert normalise(" --steps 3 2>&1 | tee log") == ["--steps", "3"]
    assert normalise(" --features classifier|inception") == ["--features", "classifier"]
