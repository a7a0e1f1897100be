"""Which rows to run, most important first, their batch sizes, and how long each is expected to take."""

from __future__ import annotations

from collections.abc import Callable

from difftools.benchmark.train_step import Combo, resolve_variant


def parse_backend_rows(spec: list[str]) -> list[tuple[str, str]]:
    rows = []
    for item in spec:
        backend, _, mode = item.partition(":")
        modes = [mode] if mode else ["eager", "compile"]
        rows += [(backend, m) for m in modes]
    return rows


def plan(*, impls: list[str], models: list[str], inputs: list[str], modes: list[str], main_model: str,
         main_input: str, backend_rows: list[str], variants: list[str], have_reference: bool,
         variant_models: list[str] | None = None, eager_models: list[str] | None = None,
         batch_for: Callable[[str], int] | None = None) -> list[Combo]:
    """All requested combos, most important first:

    0. ours and the reference, compiled, on the headline models (``variant_models``, default the main
       model) in order: the target rows;
    1. ``variants`` of our compiled row on the first headline model;
    2. ours and the reference, compiled, on the other ``models`` (the MFU-by-size rows);
    3. ``variants`` on the other headline models (variant order, then model order);
    4. eager rows (only for ``eager_models`` when given);
    5. ``backend_rows`` (``backend[:mode]``) on the main model / input.

    ``batch_for(model)`` sets each row's batch (0 = the common batch)."""
    impls = [i for i in impls if i != "reference" or have_reference]
    headline = list(variant_models) if variant_models else [main_model]
    batch_for = batch_for or (lambda model: 0)

    def combo(impl, model, inp, backend, mode, variant="default"):
        return Combo(impl, model, inp, backend, mode, variant, batch_for(model))

    grid = [combo(impl, m, i, "sdpa" if impl == "difftools" else "timm", mode)
            for impl in impls for m in models for i in inputs for mode in modes
            if mode != "eager" or eager_models is None or m in eager_models]
    extra = [combo("difftools", main_model, main_input, b, mode)
             for b, mode in parse_backend_rows(backend_rows)] if "difftools" in impls else []
    variant_rows = [combo("difftools", m, main_input, "sdpa", "compile", v)
                    for v in variants if v != "default" for m in headline if m in models or m == main_model]
    variant_rows = variant_rows if "difftools" in impls else []
    combos, seen = [], set()
    for c in grid + extra + variant_rows:
        if c.key() not in seen:
            seen.add(c.key())
            combos.append(c)
    rank = {m: i for i, m in enumerate([*headline, *models])}

    def priority(c: Combo):
        default_backend = c.backend in ("sdpa", "timm")
        on_main_input = c.input == main_input
        if c.variant != "default":
            first = c.model == headline[0]
            return (1 if first else 3, variants.index(c.variant), rank.get(c.model, 99))
        if c.mode == "compile" and default_backend and c.model in headline and on_main_input:
            return (0, headline.index(c.model), c.impl != "difftools")
        if c.mode == "compile" and default_backend:
            return (2, rank.get(c.model, 99), not on_main_input, c.impl != "difftools")
        if c.mode == "eager" and default_backend:
            return (4, rank.get(c.model, 99), not on_main_input, c.impl != "difftools")
        return (5, c.mode != "eager", {"xformers": 0, "cudnn": 1}.get(c.backend, 2))

    return sorted(combos, key=priority)


def est_seconds(combo: Combo, precompiled: bool, smoke: bool) -> float:
    """Rough duration of a combo in the timed pass (for the time limit)."""
    if smoke:  # tiny model on CPU, aot_eager
        return 2.0 if combo.mode == "eager" else 8.0
    deep = combo.model.startswith(("DiT-XL", "DiT-L"))
    if combo.mode == "eager":
        return 15.0 if deep else 8.0
    if precompiled:
        return 40.0 if deep else 25.0
    if resolve_variant(combo.variant).compile_mode == "max-autotune-no-cudagraphs":
        return 240.0
    return 120.0 if deep else 60.0
