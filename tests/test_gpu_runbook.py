"""docs/gpu_runbook.md stays sendable: every call is valid bash within the device tool's 2,000
characters, starts with the setup and the preflight, and the preflight's paths are all in the call's
carry (a path outside it would fail there, minutes into a session)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "gpu_runbook.md"


def carry_sets(text: str) -> dict[str, list[str]]:
    """``* **A** `path` (size) `path` ...`` -> {"A": [paths]} (a bullet may continue on the next line)."""
    sets = {}
    for m in re.finditer(r"^\* \*\*(\w)\*\* (.*?)(?=^\* |^\n)", text, re.M | re.S):
        sets[m.group(1)] = re.findall(r"`([^`]+)`", m.group(2))
    return sets


def calls(text: str) -> list[tuple[str, str, str]]:
    """(title, the sentence naming its carry, the bash block) of every ``## Call N`` section."""
    out = []
    for m in re.finditer(r"^## (Call \d+.*?)\n(.*?)```bash\n(.*?)```", text, re.M | re.S):
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


TEXT = RUNBOOK.read_text(encoding="utf-8")
CALLS = calls(TEXT)
SETS = carry_sets(TEXT)


def test_the_runbook_is_parsed():
    numbers = [int(re.match(r"Call (\d+)", title).group(1)) for title, _, _ in CALLS]
    assert numbers == [1, 3, 2, 4, 5, 6, 7, 8, 9]
    assert sorted(SETS) == list("ABCDEFG") and all(s[0] == ".gpu/setup.sh" for s in SETS.values())


IDS = [re.match(r"Call \d+", title).group() for title, _, _ in CALLS]


@pytest.mark.parametrize("title,carry,command", CALLS, ids=IDS)
def test_call_is_sendable(title, carry, command):
    assert len(command) <= 2000, f"{title}: {len(command)} characters (the device tool takes 2,000)"
    assert command.startswith("source .gpu/setup.sh && python3 scripts/gpu_preflight.py --cuda ")
    subprocess.run(["bash", "-n", "-c", command], check=True)
    named = re.search(r"^Carry (\w)\b", carry, re.M)
    assert named, f"{title}: no 'Carry X' sentence"
    carried = SETS[named.group(1)] + re.findall(r"\+ `([^`]+)`", carry)
    first = shlex.split(command.splitlines()[0].split("||")[0])
    paths = first[first.index("--paths") + 1:]
    for path in paths:
        assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in carried), (
            f"{title}: --paths {path} is not under any carried path {carried}")
