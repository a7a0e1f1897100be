"""Which rows to run, most important first, and how long each is expected to take."""

from __future__ import annotations

from difftools.benchmark.train_step import Combo, resolve_variant


def parse_backend_rows(spec: list[str]) -> list[tuple[str, str]]:
    rows = []
    for item in spec:
        backend, _, mode = item.partition(":")
        modes = [mode] if mode else ["eager", "compile"]
        rows += [(backend, m) for m in modes]
    return rows


def plan(*, impls: list[str], models: list[str], inputs: list[str], modes: list[str], main_model: str,
         main_input: str, backend_rows: list[str], variants: list[str], have_reference: bool) -> list[Combo]:
    """All requested combos, most important first: (1) ours vs the reference on models x inputs x
    modes, (2) ``backend_rows`` (``backend[:mode]``) on the main model / input, (3) ``variants`` of
    our compiled main row."""
    impls = [i for i in impls if i != "reference" or have_reference]
    grid = [
        Combo(impl, m, i, "sdpa" if impl == "difftools" else "timm", mode)
        for impl in impls for m in models for i in inputs for mode in modes
    ]
    extra = [Combo("difftools", main_model, main_input, b, mode)
             for b, mode in parse_backend_rows(backend_rows)] if "difftools" in impls else []
    variant_rows = [Combo("difftools", main_model, main_input, "sdpa", "compile", v)
                    for v in variants if v != "default"] if "difftools" in impls else []
    combos, seen = [], set()
    for c in grid + extra + variant_rows:
        if c.key() not in seen:
            seen.add(c.key())
            combos.append(c)

    def priority(c: Combo):
        main = c.model == main_model and c.input == main_input
        if main and c.mode == "compile" and c.variant == "default" and c.backend in ("sdpa", "timm"):
            return (0, c.impl != "difftools")  # the target row, then the reference beside it
        if c.variant != "default":
            return (1, variants.index(c.variant))
        if main and c.mode == "eager":
            return (2, c.impl != "difftools", c.backend == "math")
        if c.mode == "compile" and c.backend in ("sdpa", "timm"):
            return (3, c.model != main_model, c.input != main_input, c.impl != "difftools")
        if c.mode == "compile":
            return (4, {"xformers": 0, "cudnn": 1}.get(c.backend, 2), not main)
        return (5, c.model != main_model, c.input != main_input, c.impl != "difftools")

    return sorted(combos, key=priority)


def est_seconds(combo: Combo, precompiled: bool, smoke: bool) -> float:
    """Rough duration of a combo in the timed pass (for the time limit)."""
    if smoke:  # tiny model on CPU, aot_eager
        return 2.0 if combo.mode == "eager" else 8.0
    if combo.mode == "eager":
        return 8.0
    if precompiled:
        return 25.0
    return 240.0 if resolve_variant(combo.variant).compile_mode == "max-autotune-no-cudagraphs" else 60.0
