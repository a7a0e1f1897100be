"""One exponential-integrator step of which DDIM, DPM-Solver(++), UniPC, Euler and Heun are configurations.

Unified Sampling Framework (USF / S³, Liu et al., arXiv 2312.07243, official code thu-nics/USF;
DPM-Solver, Lu et al., arXiv 2206.00927; DPM-Solver++, arXiv 2211.01095; UniPC, Zhao et al.,
arXiv 2302.04867).

With lambda = log(alpha/sigma) and a step s -> t, h = lambda_t - lambda_s, the probability-flow
ODE has the exact variation-of-constants solutions

    data form:   x_t = (sigma_t/sigma_s) x_s + alpha_t int_{l_s}^{l_t} e^{l - l_t} x0(l) dl
    noise form:  x_t = (alpha_t/alpha_s) x_s - sigma_t int_{l_s}^{l_t} e^{l_t - l} eps(l) dl (l = lambda).

Taylor-expanding the prediction m (x0 or eps) at s with scaled derivatives d_k = h^k m^(k) / k! gives

    x_t = base + alpha_t sum_{k=1}^{p-1} g_k d_k          (data,  z = -h)
    x_t = base - sigma_t sum_{k=1}^{p-1} g_k d_k          (noise, z = +h)
    base = (sigma_t/sigma_s) x_s + alpha_t h phi_1(-h) m_s or (alpha_t/alpha_s) x_s - sigma_t h phi_1(h) m_s

with the phi-functions phi_0(z) = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z, the exact ("taylor")
coefficients g_k = k! h phi_{k+1}(z), and p the Taylor order. The d_k are estimated from q >= p - 1
other evaluations m_j at nodes r_j = (lambda_j - lambda_s)/h by polynomial interpolation of degree
q: m_j - m_s = sum_{k=1}^{q} r_j^k d_k (a q x q Vandermonde system, float64); only d_1..d_{p-1} enter
the update, so q (the "estimate order", the official code's ``Difference_q`` with its active points)
is chosen independently of p. The decisions per step (the S³ search space) are:

* prediction: ``data`` (x0) or ``noise`` (eps);
* order: the Taylor order p = 1..4; lowered automatically where history is short;
* nodes: which previous evaluations estimate the derivatives (1 = the grid point before the
  current one, 2 = the one before that, ...); default (1, ..., p-1); more nodes than p - 1 raise the
  accuracy of the derivative estimates without adding Taylor terms;
* coef: the coefficient variant (an empirical relaxation of the first derivatives' weights):
    - ``taylor``: exact g_k above;
    - ``bh1`` / ``bh2`` (UniPC's B(h)): with p = 2 (one derivative term), g_1 = B(h)/2 with B = h
      (bh1) or B = h phi_1(z) (bh2); otherwise taylor (UniPC solves the same Vandermonde system, so
      for two or more terms its coefficients coincide with the exact ones, whatever B(h));
    - ``dpm`` (DPM-Solver's published multistep coefficients, as in diffusers and k-diffusion):
      p = 2: g_1 = h phi_1(z)/2 (the "midpoint" rule, = bh2); p = 3: g_1 = h phi_2(z),
      g_2 = h phi_3(z) (half the exact 2 h phi_3(z) — see docs/samplers.md for the measured order);
* relax: the continuous relaxation c of the first derivative, g_1 <- (1 + c h) g_1 (the official
  code's ``linear`` relaxation, "derivative *= 1 + relaxation_coefficient * h", with h > 0 in both
  forms); applied to the predictor only, as there; c = 0 is no relaxation;
* corrector: ``None``; ``pseudo`` (UniC: redo the step with the next point's evaluation as an
  extra node and one more Taylor term, 0 extra NFE; the next step reuses that evaluation);
  ``implicit`` (same, but the next step evaluates again at the corrected point: +1 NFE per step —
  Heun);
* afs (first step only): the analytical first step. The evaluation at the first grid point is
  replaced by a constant data prediction x0_hat = c (a scalar, one value per channel or one per
  element of a sample), eps_hat = (x - alpha_s c)/sigma_s: one NFE less. Exact when alpha_s = 0
  (Flow at t = 1: x_1 is independent of x0, so E[x0 | x_1] = E[x0], the data mean) and an
  O(alpha_s) approximation otherwise; the official code offers c = 0 (``zero_x0``) and the data
  mean (``average_x0``). The later steps use it as an ordinary history node.

Configurations (see ``SOLVERS``): DDIM = order 1; DPM-Solver++(2M/3M) = data, dpm, 2/3;
DPM-Solver(2M/3M) = noise, dpm; UniPC = data, bh1/bh2, pseudo corrector; Euler in
sigma/alpha (k-diffusion, diffusers) = DDIM exactly (x~ = x/alpha obeys dx~/ds = eps with
s = sigma/alpha = e^{-lambda}; one Euler step in s is the order-1 update); Heun (EDM) =
noise form, order 1, implicit corrector with coef bh2 (trapezoid in s: the bh2 weight
(e^h - 1)/2 = alpha_t/sigma_t (s_s - s_t)/2). Singlestep DPM-Solver-2/3 and DPM-Solver++(2S)
use intermediate nodes at lambda_s + r h.

Infinite steps (Flow at t = 1 has lambda = -inf; a final t with sigma = 0 has lambda = +inf) are
taken in their exact limit: the order-1 update becomes alpha_t x0_s + sigma_t eps_s, nodes with
infinite lambda are dropped (their divided differences vanish), and the step is order 1.

All coefficients are computed once per grid in float64 (``plan``); the loop (``integrate``)
only forms linear combinations of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from samplers.process import Denoised, NoiseProcess, scalar_at

#: the prediction a solver step integrates: ``data`` (x0, the data form) or ``noise`` (eps, the noise
#: form); not the network's output type (``samplers.process.PREDICTIONS``: eps / x0 / v / flow).
SOLVER_PREDICTIONS = ("data", "noise")
COEFS = ("taylor", "bh1", "bh2", "dpm")
CORRECTORS = (None, "pseudo", "implicit")


# ------------------------------------------------------------------ phi functions
def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j+k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z).

    Series for |z| < 0.5 (the recursion cancels catastrophically there), recursion with expm1
    otherwise. Limits: phi_k(-inf) = 0 for k >= 1.
    """
    if math.isinf(z):
        if z < 0:
            return 0.0 if k >= 1 else 0.0
        return math.inf
    if abs(z) < 0.5:
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    if k == 0:
        return math.exp(z)
    val = math.expm1(z) / z
    for i in range(1, k):
        val = (val - 1.0 / math.factorial(i)) / z
    return val


# ------------------------------------------------------------------ strategy
MAX_ORDER = 4


@dataclass(frozen=True)
class Strategy:
    """One step's decisions (the USF / S³ search space; equations in the module docstring).

    Args:
        prediction: ``data`` (x0, DPM-Solver++/UniPC) or ``noise`` (eps, DPM-Solver/DDIM/Heun).
        order: Taylor order p = 1..4 (p - 1 derivative terms); lowered where history is short.
        coef: ``taylor`` | ``bh1`` | ``bh2`` | ``dpm``.
        corrector: None | ``pseudo`` (UniC, 0 NFE) | ``implicit`` (+1 NFE).
        nodes: previous evaluations that estimate the derivatives (1 = the one before the current
            point, 2 = ...), strictly increasing; their number q is the estimate order (q >= p - 1;
            more nodes make the estimates more accurate, not the expansion longer). Default
            (1, ..., p - 1).
        singlestep: intermediate fractions r of the step (lambda_s + r h), e.g. (0.5,) for
            DPM-Solver-2, (1/3, 2/3) for DPM-Solver-3; each costs one NFE.
        relax: c in the first-derivative relaxation g_1 <- (1 + c h) g_1 (predictor only).
        afs: analytical first step (first step only): the constant data prediction used instead of
            evaluating the model at the first grid point — 1 value (a scalar), C values (one per
            channel, dim 1 of the state) or one value per element of a sample; None evaluates.
    """

    prediction: str = "data"
    order: int = 1
    coef: str = "taylor"
    corrector: str | None = None
    nodes: tuple[int, ...] | None = None
    singlestep: tuple[float, ...] | None = None
    relax: float = 0.0
    afs: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.prediction not in SOLVER_PREDICTIONS:
            raise ValueError(f"prediction must be one of {SOLVER_PREDICTIONS}, got {self.prediction!r}")
        if not 1 <= int(self.order) <= MAX_ORDER:
            raise ValueError(f"order must be in 1..{MAX_ORDER}, got {self.order}")
        if self.coef not in COEFS:
            raise ValueError(f"coef must be one of {COEFS}, got {self.coef!r}")
        if self.corrector not in CORRECTORS:
            raise ValueError(f"corrector must be one of {CORRECTORS}, got {self.corrector!r}")
        if self.singlestep is not None and self.corrector is not None:
            raise ValueError("singlestep strategies take no corrector")
        # lists (from JSON or user code) become tuples, so that strategies compare and hash by value
        for name in ("nodes", "singlestep", "afs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.nodes is not None:
            nodes = self.nodes
            if not nodes or any(isinstance(j, bool) or int(j) != j or j < 1 for j in nodes):
                raise ValueError(f"nodes must be positive integers, got {list(nodes)}")
            if list(nodes) != sorted(set(nodes)):
                raise ValueError(f"nodes must be strictly increasing, got {list(nodes)}")
            if len(nodes) < int(self.order) - 1:
                raise ValueError(
                    f"order {self.order} needs at least {int(self.order) - 1} nodes (one per derivative "
                    f"term), got {list(nodes)}"
                )
        if not math.isfinite(float(self.relax)):
            raise ValueError(f"relax must be a finite number, got {self.relax!r}")
        if self.afs is not None:
            if not self.afs or not all(math.isfinite(float(v)) for v in self.afs):
                raise ValueError("afs must be a non-empty list of finite numbers (the first step's x0)")

    def __repr__(self) -> str:
        fields = [f"{self.prediction!r}", f"order={self.order}", f"coef={self.coef!r}"]
        for name in ("corrector", "nodes", "singlestep"):
            if getattr(self, name) is not None:
                fields.append(f"{name}={getattr(self, name)!r}")
        if self.relax:
            fields.append(f"relax={self.relax:g}")
        if self.afs is not None:  # may hold one value per pixel
            fields.append(f"afs=<{len(self.afs)} value{'s' if len(self.afs) > 1 else ''}>")
        return f"Strategy({', '.join(fields)})"

    @classmethod
    def from_any(cls, s) -> Strategy:
        if isinstance(s, Strategy):
            return s
        if isinstance(s, dict):
            return cls(**s)
        raise TypeError(f"a strategy must be a Strategy or a dict, got {type(s).__name__}")


# ------------------------------------------------------------------ coefficients
def derivative_weights(
    h: float,
    rs: Sequence[float],
    prediction: str,
    coef: str,
    terms: int | None = None,
    relax: float = 0.0,
) -> list[float]:
    """Weights w_j with  sum_{k<=terms} g_k d_k = sum_j w_j (m_j - m_s)  for nodes at relative
    positions r_j (j = 1..q, q = len(rs) >= terms; default terms = q).

    d = V^{-1} (m - m_s) with V_jk = r_j^k (k = 1..q), so w = V^{-T} g with g_k = 0 for k > terms:
    all q nodes estimate d_1..d_terms, only those enter the update.
    """
    n = len(rs)
    m = n if terms is None else int(terms)
    if not 0 <= m <= n:
        raise ValueError(f"{m} derivative terms need at least {m} nodes, got {n}")
    if m == 0:
        return [0.0] * n
    z = -h if prediction == "data" else h
    g = [math.factorial(k) * h * phi(k + 1, z) for k in range(1, m + 1)] + [0.0] * (n - m)
    if coef in ("bh1", "bh2", "dpm") and m == 1:
        g[0] = 0.5 * (h if coef == "bh1" else h * phi(1, z))
    elif coef == "dpm" and m == 2:
        g[1] = h * phi(3, z)
    if relax:
        g[0] *= 1.0 + relax * h
    vand = torch.tensor([[r**k for k in range(1, n + 1)] for r in rs], dtype=torch.float64)
    w = torch.linalg.solve(vand.T, torch.tensor(g, dtype=torch.float64))
    return [float(v) for v in w]


# Reference to an evaluation inside one step: ("hist", j) = j-th previous grid evaluation
# (0 = current point), ("stage", k) = k-th singlestep stage, ("new",) = the corrector evaluation.
Ref = tuple


@dataclass
class Update:
    """x_out = cx * x_s + cp * P + sum (coef * evals[ref].field)  (P = the step's primary prediction
    of the current point, possibly modified by DualFast; terms use raw evaluations)."""

    cx: float
    cp: float
    primary: str  # "x0" or "eps": which field P is
    terms: list[tuple[Ref, str, float]] = field(default_factory=list)
    t_out: float = 0.0


@dataclass
class StepPlan:
    """Everything the loop needs for one grid step t_s -> t_t.

    ``nodes_used``: the history nodes the step's derivative estimates use (after dropping those
    not yet available or at infinite lambda); ``afs``: for an analytical first step, the constant
    x0 prediction and (alpha_s, sigma_s) to form eps from it, else None.
    """

    index: int
    t_s: float
    t_t: float
    strategy: Strategy
    stages: list[Update]  # singlestep intermediate updates (each followed by an evaluation)
    predictor: Update
    corrector: Update | None  # applied after evaluating at the predictor's output
    corrector_kind: str | None
    order_used: int
    nodes_used: tuple[int, ...] = ()
    afs: tuple[tuple[float, ...], float, float] | None = None


def _scalars(process: NoiseProcess, t: float):
    t = float(t)
    a, s = scalar_at(process.alpha, t), scalar_at(process.sigma, t)
    lam = scalar_at(process.lambda_, t) if s > 0 and a > 0 else (math.inf if s == 0 else -math.inf)
    return a, s, lam


def _update(
    process: NoiseProcess,
    t_s: float,
    t_t: float,
    prediction: str,
    coef: str,
    nodes: list[tuple[Ref, float]],
    terms: int | None = None,
    relax: float = 0.0,
) -> Update:
    """The update s -> t with derivative nodes [(ref, lambda_node)] of which the first ``terms``
    derivatives enter (default: as many as nodes); drops nodes with infinite lambda."""
    a_s, s_s, lam_s = _scalars(process, t_s)
    a_t, s_t, lam_t = _scalars(process, t_t)
    h = lam_t - lam_s
    primary = "x0" if prediction == "data" else "eps"
    if not math.isfinite(h):
        # Exact limit of an infinite step (Flow at t=1: lambda_s = -inf; sigma_t = 0: lambda_t = +inf).
        # Both forms reduce to alpha_t x0_s + sigma_t eps_s; nodes' divided differences vanish.
        if prediction == "data":
            # (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s with e^{-h} = 0
            return Update(cx=s_t / s_s, cp=a_t, primary="x0", t_out=t_t)
        if a_s > 0:
            # alpha_t (x_s - sigma_s eps_s)/alpha_s + sigma_t eps_s
            return Update(cx=a_t / a_s, cp=s_t - a_t * s_s / a_s, primary="eps", t_out=t_t)
        return Update(cx=0.0, cp=s_t, primary="eps", terms=[(("hist", 0), "x0", a_t)], t_out=t_t)
    finite = [(ref, lam) for ref, lam in nodes if math.isfinite(lam)]
    rs = [(lam - lam_s) / h for _, lam in finite]
    m = len(finite) if terms is None else min(int(terms), len(finite))
    w = derivative_weights(h, rs, prediction, coef, m, relax) if m > 0 else []
    if prediction == "data":
        cx, cp, scale = s_t / s_s, -a_t * math.expm1(-h), a_t
    else:
        cx, cp, scale = a_t / a_s, -s_t * math.expm1(h), -s_t
    terms_out = [(ref, primary, scale * wj) for (ref, _), wj in zip(finite, w, strict=False) if wj != 0.0]
    if w:
        terms_out.append((("hist", 0), primary, -scale * sum(w)))
    return Update(cx=cx, cp=cp, primary=primary, terms=terms_out, t_out=t_t)


def plan(process: NoiseProcess, times: torch.Tensor, strategies: Sequence[Strategy]) -> list[StepPlan]:
    """Precompute every step's coefficients for the grid ``times`` (float64, decreasing)."""
    ts = [float(t) for t in times]
    if len(strategies) != len(ts) - 1:
        raise ValueError(f"need one strategy per step: {len(ts) - 1} steps, {len(strategies)} strategies")
    for i, strat in enumerate(strategies):
        if i > 0 and strat.afs is not None:
            raise ValueError(f"step {i}: the analytical first step (afs) is a decision of step 0 only")
    lams = [_scalars(process, t)[2] for t in ts]
    plans: list[StepPlan] = []
    for i, strat in enumerate(strategies):
        t_s, t_t = ts[i], ts[i + 1]
        h = lams[i + 1] - lams[i]
        afs = None
        if strat.afs is not None:
            a_s, s_s, _ = _scalars(process, t_s)
            if s_s <= 0:
                raise ValueError(f"the analytical first step needs sigma > 0 at t = {t_s}")
            afs = (strat.afs, a_s, s_s)
        if strat.singlestep is not None:
            p = _plan_singlestep(process, i, t_s, t_t, h, lams[i], strat)
            p.afs = afs
            plans.append(p)
            continue
        order = int(strat.order) if math.isfinite(h) else 1
        wanted = strat.nodes if strat.nodes is not None else tuple(range(1, order))
        # a node exists once its evaluation does (j <= i) and counts at finite lambda
        available = tuple(j for j in wanted if j <= i and math.isfinite(lams[i - j])) if order > 1 else ()
        terms = min(order - 1, len(available))
        nodes = [(("hist", j), lams[i - j]) for j in available]
        pred = _update(process, t_s, t_t, strat.prediction, strat.coef, nodes, terms, float(strat.relax))
        corr = None
        if strat.corrector is not None and math.isfinite(h):
            # UniC: the new evaluation joins the nodes and adds one Taylor term (no relaxation)
            corr = _update(
                process, t_s, t_t, strat.prediction, strat.coef, nodes + [(("new",), lams[i + 1])], terms + 1
            )
        plans.append(
            StepPlan(
                i,
                t_s,
                t_t,
                strat,
                [],
                pred,
                corr,
                strat.corrector if corr else None,
                1 + terms,
                available,
                afs,
            )
        )
    return plans


def _plan_singlestep(process, i, t_s, t_t, h, lam_s, strat: Strategy) -> StepPlan:
    if not math.isfinite(h):
        # No intermediate point inside an infinite lambda interval: exact order-1 limit.
        pred = _update(process, t_s, t_t, strat.prediction, strat.coef, [])
        return StepPlan(i, t_s, t_t, replace(strat, singlestep=None, order=1), [], pred, None, None, 1)
    rs = list(strat.singlestep)
    if not all(0 < r < 1 for r in rs) or sorted(rs) != rs:
        raise ValueError(f"singlestep fractions must increase inside (0, 1), got {rs}")
    lam_k = [lam_s + r * h for r in rs]
    t_k = [float(process.t_of_lambda(torch.tensor(lk, dtype=torch.float64))) for lk in lam_k]
    stages = []
    for k in range(len(rs)):
        # Stage k steps s -> s_k using the previous stage as its node (exact Taylor coefficient).
        nodes = [(("stage", k - 1), lam_k[k - 1])] if k > 0 else []
        stages.append(_update(process, t_s, t_k[k], strat.prediction, "taylor", nodes))
    pred = _update(
        process,
        t_s,
        t_t,
        strat.prediction,
        strat.coef,
        [(("stage", len(rs) - 1), lam_k[-1])],
        relax=float(strat.relax),
    )
    return StepPlan(i, t_s, t_t, strat, stages, pred, None, None, len(rs) + 1)


# ------------------------------------------------------------------ the loop
PredictionModifier = Callable[..., torch.Tensor]


def apply_update(
    upd: Update,
    x: torch.Tensor,
    primary: torch.Tensor,
    hist: list[Denoised],
    stage_evals: list,
    new_eval: Denoised | None,
) -> torch.Tensor:
    """The update ``upd`` from state x: cx x + cp primary + the weighted evaluations of its terms
    (``hist``: this run's grid evaluations, the current point last; ``stage_evals``: this step's
    singlestep stages; ``new_eval``: the corrector's evaluation)."""
    out = x * upd.cx if upd.cx != 0.0 else torch.zeros_like(x)
    out.add_(primary, alpha=upd.cp)
    for ref, fld, c in upd.terms:
        if ref[0] == "hist":
            den = hist[-1 - ref[1]]
        elif ref[0] == "stage":
            den = stage_evals[ref[1]]
        else:
            den = new_eval
        out.add_(getattr(den, fld), alpha=c)
    return out


def analytic_prediction(x: torch.Tensor, x0: Sequence[float], alpha: float, sigma: float) -> Denoised:
    """The analytical first step's "evaluation": x0_hat = c (constant), eps_hat = (x - alpha c)/sigma.

    ``x0`` holds 1 value (a scalar), C = x.shape[1] values (one per channel) or one value per
    element of a sample (x.shape[1:]).
    """
    values = torch.as_tensor(list(x0), dtype=x.dtype, device=x.device)
    per_sample = math.prod(x.shape[1:])
    if values.numel() == 1:
        c = values.reshape((1,) * x.ndim)
    elif x.ndim >= 2 and values.numel() == x.shape[1]:
        c = values.reshape(1, -1, *([1] * (x.ndim - 2)))
    elif values.numel() == per_sample:
        c = values.reshape(1, *x.shape[1:])
    else:
        raise ValueError(
            f"afs has {values.numel()} values; a state of shape {tuple(x.shape)} needs 1, "
            f"{x.shape[1] if x.ndim >= 2 else 1} (per channel) or {per_sample} (per element)"
        )
    x0_hat = c.expand_as(x)
    return Denoised(x0_hat, (x - alpha * x0_hat) / sigma)


def integrate(
    model_fn,
    x: torch.Tensor,
    plans: list[StepPlan],
    cond: dict,
    modifier: PredictionModifier | None = None,
    hooks: Sequence = (),
    callback: Callable | None = None,
    progress=None,
) -> tuple[torch.Tensor, list[Denoised]]:
    """Run the planned steps from state x. Returns (x at the last grid time, grid evaluations).

    A plan with ``afs`` (analytical first step) takes :func:`analytic_prediction` instead of a model
    evaluation at its first point.

    ``modifier(den, x, t, step_index, primary) -> tensor`` may replace the primary prediction used
    in the zeroth-order term (DualFast); derivative estimates always use raw evaluations.
    """
    hist: list[Denoised] = []
    carried: Denoised | None = None
    n = len(plans)
    for p in plans:
        if p.afs is not None:
            den = analytic_prediction(x, *p.afs)
        else:
            den = carried if carried is not None else model_fn.predict(x, p.t_s, **cond)
        carried = None
        hist.append(den)
        primary = getattr(den, p.predictor.primary)
        if modifier is not None:
            primary = modifier(den, x, p.t_s, p.index, p.predictor.primary)
        stage_evals = []
        for stage in p.stages:
            x_k = apply_update(stage, x, primary, hist, stage_evals, None)
            stage_evals.append(model_fn.predict(x_k, stage.t_out, **cond))
        x_next = apply_update(p.predictor, x, primary, hist, stage_evals, None)
        if p.corrector is not None and (p.corrector_kind == "implicit" or p.index < n - 1):
            new_eval = model_fn.predict(x_next, p.t_t, **cond)
            x_next = apply_update(p.corrector, x, primary, hist, stage_evals, new_eval)
            if p.corrector_kind == "pseudo":
                carried = new_eval  # UniC: the next step reuses this evaluation (0 NFE)
        for hook in hooks:
            x_next = hook(model_fn, x, x_next, p.t_s, p.t_t, p.index, cond)
        if callback is not None:
            callback(dict(i=p.index, t=p.t_s, x=x, x0=den.x0, t_next=p.t_t, x_next=x_next))
        x = x_next
        if progress is not None:
            progress.update(1)
    return x, hist
