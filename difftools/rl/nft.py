"""DiffusionNFT: online reinforcement learning on the forward process (Zheng et al. 2025, arXiv 2509.16117).

A rectified-flow model (x_t = (1 - t) x0 + t eps, velocity v = eps - x0, :class:`samplers.process.Flow`)
is fine-tuned from its own samples and a scalar reward, without likelihoods, without the reverse
(sampling) process in the loss and without classifier-free guidance:

1. **Collect** clean samples x0 with the *old* policy v_old and any black-box solver; G samples per
   condition (a class label here: the "prompt group").
2. **Reward and advantage** (:func:`group_advantages`, :func:`optimality_weights`)::

       A_i = (R_i - mean_{j in group(i)} R_j) / (max(std_all(R), s_min) + 1e-4)   (group mean, GLOBAL std)
       r_i = 1/2 + 1/2 clip(A_i, -c, c) / c,   c = 5                            (r in [0, 1])

   r is the probability that sample i is "good"; a group whose rewards are all equal gets r = 1/2.
   The std floor s_min (0 = off, the paper) keeps a batch of nearly equal rewards from being blown
   up to unit-scale advantages.
3. **Forward-process loss** (:func:`implicit_policies`, :func:`nft_loss`, :class:`NFTLoss`): fresh eps,
   a time t from the training grid, x_t = (1 - t) x0 + t eps, target v = eps - x0, and the two
   implicit policies built from the trained v_theta and the frozen v_old::

       v+ = (1 - beta) v_old + beta v_theta        (positive policy)
       v- = (1 + beta) v_old - beta v_theta        (negative policy, the reflection of v+ in v_old)
       L  = s_pol E[ r e(v+) + (1 - r) e(v-) ] / beta  +  w_ref E ||v_theta - v_ref||^2

   At v_theta = v_old both policies equal v_old, so the loss value ignores r, but its gradient
   pulls v_theta toward the data of good samples (r > 1/2) and away from bad ones (per element,
   velocity form: dL/dv_theta = 2 s_pol (2r - 1)(v_old - v)). The paper shows the optimum is
   v_theta* = v_old + (2/beta) Delta, Delta = p(o=1 | x_t) (v_pos - v_old), where v_pos is the
   velocity of the reward-tilted distribution r(x0) pi_old(x0) / E[r]: a guidance direction learned
   into the weights (hence CFG-free). The reference term keeps v_theta near the frozen base v_ref.
4. **Old policy** (:func:`soft_update`, :class:`OldPolicy`): after each iteration
   old <- d old + (1 - d) theta with d = :func:`old_decay` of the optimizer step count (the
   released code's ``return_decay(global_step)``), so the sampling policy trails the trained one.

Two per-sample errors e (``form``):

* ``x0_adaptive`` (the released code's only form, the default): in x0 space, x0± = x_t - t v± and
  e = mean((x0± - x0)^2) / sg(mean|x0± - x0|) with a stop-gradient (sg) per-sample weight clipped at
  1e-5. Since x_t = x0 + t v, x0± - x0 = t (v - v±), so e = t mean(v± - v)^2 / mean|v± - v|: it
  weights each time by t (a near-clean time barely counts) and self-normalises each sample's scale.
* ``velocity``: e = mean over elements of ||v± - v||^2, the paper's equation.

``s_pol`` (``policy_scale``) is the released code's factor ``adv_clip_max`` = 5 on the policy loss.
Adam barely sees a constant factor, but it sets the policy term's weight against the reference
term and the gradient clip, so it is kept (default 5).

**Training times.** The released code trains at the times its sampler visits: SD3's shifted
flow-matching schedule, t = s u / (1 + (s - 1) u) with u uniform (shift s = 3, 10 steps:
1.0, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.009), 9 of the 10 per sample
(``timestep_fraction`` 0.99). :func:`shifted_times` builds that grid and ``t_floor`` drops the
times below it (default 0.1 in conf/nft.yaml: only the near-clean t = 0.009 goes; the x0-adaptive
form gives it a weight of about 1 % of t = 1 anyway).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from samplers.process import Flow, NoiseProcess

FORMS = ("velocity", "x0_adaptive")
#: named old-policy schedules (rate, cap, flat) of the released code's ``return_decay``:
#: ``fast`` = decay_type 1 (its default), ``slow`` = decay_type 2 (its OCR recipe, "for stability")
OLD_SCHEDULES = {"fast": (0.001, 0.5, 0), "slow": (0.0075, 0.999, 75)}


# ------------------------------------------------------------------------------- advantages
def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4, std_floor: float = 0.0
) -> torch.Tensor:
    """A_i = (R_i - mean of R over i's group) / (max(std of ALL rewards, std_floor) + eps)   [N] float64.

    ``groups`` [N] holds any integer group id (the class label of the condition). The global
    (population, ddof = 0) standard deviation is the paper's choice over per-group std: a group of
    near-identical rewards is not blown up to unit scale by its own tiny std. ``std_floor`` (0 =
    off) does the same for the whole batch: when every reward is nearly equal, the advantages stay
    small instead of being normalised to unit scale."""
    rewards = torch.as_tensor(rewards).double().flatten()
    groups = torch.as_tensor(groups).flatten().to(rewards.device)
    if rewards.shape != groups.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} differ in length")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf: the reward model returned non-finite values")
    if std_floor < 0:
        raise ValueError(f"std_floor must be >= 0, got {std_floor}")
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    total = torch.zeros_like(count)
    count.index_add_(0, inverse, torch.ones_like(rewards))
    total.index_add_(0, inverse, rewards)
    group_mean = (total / count)[inverse]
    std = rewards.std(unbiased=False).clamp(min=float(std_floor))
    return (rewards - group_mean) / (std + eps)


def optimality_weights(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A, -clip, clip) / clip, in [0, 1]: the "optimality probability" of a sample."""
    if clip <= 0:
        raise ValueError(f"advantage clip must be > 0, got {clip}")
    return 0.5 + 0.5 * advantages.clamp(-clip, clip) / clip


# ------------------------------------------------------------------------------- training times
def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """t = s u / (1 + (s - 1) u): SD3's resolution shift (Esser et al. 2024, arXiv 2403.03206),
    which moves a uniform grid toward the noise end for s > 1."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def shifted_times(steps: int = 10, shift: float = 3.0, sigma_min: float = 1e-3) -> torch.Tensor:
    """The ``steps`` evaluation times of a shifted flow-matching sampler, float64, decreasing.

    Exactly the times of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)
    .set_timesteps(steps)`` (divided by its 1000 training timesteps), which the released DiffusionNFT
    code samples SD3.5 with and trains on: u runs linearly from 1 to shift(sigma_min) and
    t = shift(u). For shift 3 and 10 steps: 1.0, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465,
    0.278, 0.009."""
    if int(steps) < 1 or shift <= 0 or not 0 < sigma_min < 1:
        raise ValueError(
            f"shifted_times needs steps >= 1, shift > 0 and 0 < sigma_min < 1; got steps={steps}, "
            f"shift={shift}, sigma_min={sigma_min}"
        )
    u_end = float(shift_time(torch.tensor(float(sigma_min), dtype=torch.float64), shift))
    u = torch.linspace(1.0, u_end, int(steps), dtype=torch.float64)
    return shift_time(u, shift)


# ------------------------------------------------------------------------------- loss
def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float):
    """(v+, v-) = ((1 - beta) v_old + beta v_theta, (1 + beta) v_old - beta v_theta)."""
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_target: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    form: str = "velocity",
    x_t: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    min_weight: float = 1e-5,
) -> torch.Tensor:
    """Per-sample DiffusionNFT loss [B] = (r e(v+) + (1 - r) e(v-)) / beta (see the module docstring;
    without the policy scale).

    Args:
        v_theta: velocity of the trained policy [B, ...] (with gradient).
        v_old: velocity of the old (sampling) policy, treated as a constant (detached here).
        v_target: the flow-matching target eps - x0.
        r: [B] optimality weights in [0, 1].
        beta: the implicit-policy step (1 for one reward; 0.1 in the paper for several).
        form: ``velocity`` (e = mean ||v± - v||^2) or ``x0_adaptive`` (e = mean (x0± - x0)^2 /
            sg(mean |x0± - x0|), x0± = x_t - t v±; needs x_t, t and x0).
    """
    if form not in FORMS:
        raise ValueError(f"unknown NFT loss form {form!r}; expected one of {FORMS}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if r.ndim != 1 or r.shape[0] != v_theta.shape[0]:
        raise ValueError(f"r must be [B] with B = {v_theta.shape[0]}, got {tuple(r.shape)}")
    v_pos, v_neg = implicit_policies(v_theta, v_old.detach(), beta)
    if form == "velocity":
        err_pos = _per_sample_mean((v_pos - v_target) ** 2)
        err_neg = _per_sample_mean((v_neg - v_target) ** 2)
    else:
        if x_t is None or t is None or x0 is None:
            raise ValueError("form='x0_adaptive' needs x_t, t and x0")
        t_b = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        err_pos = _adaptive_x0_error(x_t - t_b * v_pos, x0, min_weight)
        err_neg = _adaptive_x0_error(x_t - t_b * v_neg, x0, min_weight)
    r = r.to(err_pos.dtype)
    return (r * err_pos + (1.0 - r) * err_neg) / beta


def _adaptive_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor, min_weight: float) -> torch.Tensor:
    """mean (x0_pred - x0)^2 / sg(mean |x0_pred - x0|): the per-sample weight is a constant of the
    gradient (computed in float64, as a small mean of absolute values)."""
    with torch.no_grad():
        weight = _per_sample_mean((x0_pred.double() - x0.double()).abs()).clamp(min=min_weight)
    return _per_sample_mean((x0_pred - x0) ** 2) / weight.to(x0_pred.dtype)


class NFTLoss:
    """One DiffusionNFT minibatch loss: ``loss(model, old_model, x0, y, r, generator, ref_model)``.

    Each clean sample x0 is noised at ``t_per_sample`` times with fresh eps; the old policy (and the
    frozen reference, when given) are evaluated without gradient at the same (x_t, t). The times
    and noise are drawn from ``generator``, or passed in as ``t`` and ``eps`` (then the loss of a
    sample does not depend on which minibatch it lands in: the recipe draws them per iteration).

    Args:
        process: must be :class:`~samplers.process.Flow` (the velocity eps - x0 is the target).
        beta: implicit-policy step.
        form: ``x0_adaptive`` | ``velocity`` (see :func:`nft_loss`).
        ref_weight: weight of mean ||v_theta - v_ref||^2 toward the frozen base (0 = off; the
            released code uses 1e-4). A reference passed with weight 0 is still evaluated, to log
            ``ref_deviation``.
        times: the training-time grid (1-D, in (0, 1]; e.g. :func:`shifted_times`, or a solver's
            evaluation times); None draws t ~ U[max(t_min, t_floor), t_max].
        t_per_sample: distinct grid times per sample (None = every grid time left above the floor).
        t_floor: grid times below it are never trained on (0 = keep all).
        policy_scale: the constant factor on the policy loss (released code: 5).
    """

    def __init__(
        self,
        process: NoiseProcess,
        beta: float = 1.0,
        form: str = "x0_adaptive",
        ref_weight: float = 1e-4,
        times=None,
        t_per_sample: int | None = 1,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        t_floor: float = 0.0,
        policy_scale: float = 5.0,
    ):
        if not isinstance(process, Flow):
            raise ValueError(
                f"DiffusionNFT needs a rectified-flow model (process Flow, prediction 'flow'); "
                f"got process {process!r}"
            )
        if form not in FORMS:
            raise ValueError(f"unknown NFT loss form {form!r}; expected one of {FORMS}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if ref_weight < 0:
            raise ValueError(f"ref_weight must be >= 0, got {ref_weight}")
        if policy_scale <= 0:
            raise ValueError(f"policy_scale must be > 0, got {policy_scale}")
        if not 0 <= t_floor < 1:
            raise ValueError(f"t_floor must be in [0, 1), got {t_floor}")
        self.process, self.beta, self.form, self.ref_weight = process, float(beta), form, float(ref_weight)
        self.policy_scale, self.t_floor = float(policy_scale), float(t_floor)
        self.t_min, self.t_max = max(float(t_min), self.t_floor), float(t_max)
        self.times = None
        if times is not None:
            grid = torch.as_tensor(times, dtype=torch.float64).flatten()
            if grid.numel() < 1 or bool(((grid <= 0) | (grid > 1)).any()):
                raise ValueError(f"training times must lie in (0, 1], got {grid.tolist()}")
            kept = grid[grid >= self.t_floor]
            if kept.numel() == 0:
                raise ValueError(
                    f"t_floor={self.t_floor} leaves none of the training times "
                    f"{[round(v, 4) for v in grid.tolist()]}; lower it"
                )
            self.times = kept.float()
        elif not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(
                f"uniform training times need 0 <= max(t_min, t_floor) < t_max <= 1; got "
                f"t_min={t_min}, t_floor={t_floor}, t_max={t_max}"
            )
        if t_per_sample is None:
            if self.times is None:
                raise ValueError("t_per_sample=None (every grid time) needs a time grid (times=)")
            t_per_sample = self.times.numel()
        if int(t_per_sample) < 1 or (self.times is not None and int(t_per_sample) > self.times.numel()):
            limit = "" if self.times is None else f" and <= the {self.times.numel()} training times"
            raise ValueError(f"t_per_sample must be >= 1{limit}, got {t_per_sample}")
        self.t_per_sample = int(t_per_sample)

    def draw_times(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """[n * K] times, sample-major (the K times of sample i are entries i*K .. i*K + K - 1)."""
        k = self.t_per_sample
        if self.times is None:
            return self.t_min + (self.t_max - self.t_min) * torch.rand(
                n * k, generator=generator, device=device
            )
        # K distinct grid points per sample: the first K of a random permutation of the grid
        keys = torch.rand(n, self.times.numel(), generator=generator, device=device)
        idx = keys.argsort(dim=1)[:, :k]
        return self.times.to(device)[idx].reshape(-1)

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [n K], eps [n K, ...]) for the n samples x0, drawn in that order from ``generator``."""
        k = self.t_per_sample
        t = self.draw_times(x0.shape[0], generator, x0.device).to(x0.dtype)
        eps = torch.randn(
            (x0.shape[0] * k, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype
        )
        return t, eps

    def __call__(
        self,
        model,
        old_model,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        r: torch.Tensor,
        generator: torch.Generator | None = None,
        ref_model=None,
        *,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ):
        """(scalar loss, logs dict of detached scalars)."""
        k = self.t_per_sample
        if t is None or eps is None:
            if generator is None:
                raise ValueError("NFTLoss needs generator= or both t= and eps=")
            t, eps = self.draw(x0, generator)
        if t.shape[0] != x0.shape[0] * k or eps.shape[0] != t.shape[0]:
            raise ValueError(
                f"t and eps must hold {k} rows per sample ({x0.shape[0] * k}), got "
                f"{t.shape[0]} and {eps.shape[0]}"
            )
        x0 = x0.repeat_interleave(k, dim=0)
        r = r.repeat_interleave(k, dim=0)
        cond = {} if y is None else {"y": y.repeat_interleave(k, dim=0)}
        t = t.to(x0.dtype)
        x_t = self.process.marginal(x0, eps, t)
        v_target = self.process.target(x0, eps, t, "flow")
        with torch.no_grad():
            v_old = old_model(x_t, t, **cond).float()
        v_theta = model(x_t, t, **cond).float()
        per_sample = nft_loss(
            v_theta, v_old, v_target.float(), r, self.beta, self.form, x_t.float(), t.float(), x0.float()
        )
        policy = self.policy_scale * per_sample.mean()
        loss = policy
        logs = {"policy_loss": policy.detach(), "old_deviation": ((v_theta.detach() - v_old) ** 2).mean()}
        if ref_model is not None:
            with torch.no_grad():
                v_ref = ref_model(x_t, t, **cond).float()
            ref_term = ((v_theta - v_ref) ** 2).mean()
            if self.ref_weight > 0:
                loss = loss + self.ref_weight * ref_term
            logs["ref_deviation"] = ref_term.detach()
        elif self.ref_weight > 0:
            raise ValueError("ref_weight > 0 needs ref_model= (the frozen base model)")
        return loss, logs


# ------------------------------------------------------------------------------- old policy
def old_decay(step: int, rate: float = 0.001, cap: float = 0.5, flat: int = 0) -> float:
    """d = 0 for step < flat, else min(rate (step - flat), cap): the released code's ``return_decay``
    (``fast``: rate 0.001, cap 0.5; ``slow``: flat 75, rate 0.0075, cap 0.999), evaluated at the
    number of optimizer steps taken when the iteration ends."""
    if step < flat:
        return 0.0
    return min(rate * (step - flat), cap)


def old_schedule(
    name: str, rate: float | None = None, cap: float | None = None, flat: int | None = None
) -> tuple[float, float, int]:
    """(rate, cap, flat) of a named schedule (:data:`OLD_SCHEDULES`), or ``custom`` from the three
    values given."""
    if name == "custom":
        if rate is None or cap is None or flat is None:
            raise ValueError("old.schedule=custom needs old.rate, old.cap and old.flat")
        return float(rate), float(cap), int(flat)
    if name not in OLD_SCHEDULES:
        raise ValueError(
            f"unknown old-policy schedule {name!r}; expected one of {sorted(OLD_SCHEDULES) + ['custom']}"
        )
    return OLD_SCHEDULES[name]


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay target + (1 - decay) source, over floating-point state (others copied)."""
    new = source.state_dict()
    for name, old in target.state_dict().items():
        src = new[name].detach()
        if old.is_floating_point():
            old.lerp_(src.to(old.dtype), 1.0 - decay)  # old + (1 - d)(new - old) = d old + (1 - d) new
        else:
            old.copy_(src)


class OldPolicy:
    """The sampling ("old") policy: a frozen copy of the model, softly pulled toward it.

        theta_old <- d theta_old + (1 - d) theta,   d = :func:`old_decay` (step)

    ``model`` is the frozen copy (eval mode, no gradients); call it like the trained model.
    """

    def __init__(self, model: nn.Module, rate: float = 0.001, cap: float = 0.5, flat: int = 0):
        if rate < 0 or not 0 <= cap < 1 or flat < 0:
            raise ValueError(
                f"old-policy schedule needs rate >= 0, 0 <= cap < 1, flat >= 0; got "
                f"rate={rate}, cap={cap}, flat={flat}"
            )
        self.rate, self.cap, self.flat = float(rate), float(cap), int(flat)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return old_decay(step, self.rate, self.cap, self.flat)

    def update(self, model: nn.Module, step: int) -> float:
        """Soft update after ``step`` optimizer steps; returns the decay used."""
        d = self.decay_at(step)
        soft_update(self.model, model, d)
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)
