"""DiffusionNFT: online reinforcement learning on the forward process (Zheng et al. 2025, arXiv 2509.16117).

A rectified-flow model (x_t = (1 - t) x0 + t eps, velocity v = eps - x0, :class:`samplers.process.Flow`)
is fine-tuned from its own samples and a scalar reward, without likelihoods, without the reverse
(sampling) process in the loss and without classifier-free guidance:

1. **Collect** clean samples x0 with the *old* policy v_old and any black-box solver; G samples per
   condition (a class label here: the "prompt group").
2. **Reward and advantage** (:func:`group_advantages`, :func:`optimality_weights`)::

       A_i = (R_i - mean_{j in group(i)} R_j) / (std_all(R) + 1e-4)       (group mean, GLOBAL std)
       r_i = 1/2 + 1/2 clip(A_i, -c, c) / c,   c = 5                       (r in [0, 1])

   r is the probability that sample i is "good"; a group whose rewards are all equal gets r = 1/2.
3. **Forward-process loss** (:func:`implicit_policies`, :func:`nft_loss`): fresh eps, a time t (the
   solver's times or uniform), x_t = (1 - t) x0 + t eps, target v = eps - x0, and the two implicit
   policies built from the trained v_theta and the frozen v_old::

       v+ = (1 - beta) v_old + beta v_theta        (positive policy)
       v- = (1 + beta) v_old - beta v_theta        (negative policy, the reflection of v+ in v_old)
       L  = E[ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ] / beta  (+ w_ref ||v_theta - v_ref||^2)

   At v_theta = v_old both policies equal v_old, so the loss value ||v_old - v||^2 / beta ignores r,
   but its gradient dL/dv_theta = 2 (2r - 1)(v_old - v) (per element, before averaging) pulls
   v_theta toward the data of good samples (r > 1/2) and away from bad ones. The paper shows the
   optimum is v_theta* = v_old + (2/beta) Delta, Delta = p(o=1 | x_t) (v_pos - v_old), where v_pos
   is the velocity of the reward-tilted distribution r(x0) pi_old(x0) / E[r]: a guidance direction
   learned into the weights (hence CFG-free). The optional reference term keeps v_theta near the
   frozen base v_ref.
4. **Old policy** (:class:`OldPolicy`): after each iteration old <- d old + (1 - d) theta with
   d = min(rate * k, cap) (rate 0.001, cap 0.5: the paper's soft update), so the sampling policy
   trails the trained one slowly and starts fully on-policy (d = 0).

Two per-sample forms of the squared errors (``form``):

* ``velocity`` (default): mean over elements of ||v± - v||^2, the equation above.
* ``x0_adaptive`` (the released code's form): in x0 space, x0± = x_t - t v± and the error is
  mean((x0± - x0)^2) / sg(mean|x0± - x0|) with a stop-gradient (sg) per-sample weight clipped at
  1e-5. Since x_t = x0 + t v, x0± - x0 = t (v - v±), so this is t mean(v± - v)^2 / mean|v± - v|:
  it down-weights small t and self-normalises each sample's scale. The released code also
  multiplies the policy loss by the clip c = 5, a constant that Adam's updates do not see (it
  only changes the weight of the reference term relative to it); it is left out here.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from samplers.process import Flow, NoiseProcess

FORMS = ("velocity", "x0_adaptive")
T_SOURCES = ("sampler", "uniform")


# ------------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean of R over i's group) / (std of ALL rewards + eps)   [N] float64.

    ``groups`` [N] holds any integer group id (the class label of the condition). The global
    (population, ddof = 0) standard deviation is the paper's choice over per-group std: a group of
    near-identical rewards is not blown up to unit scale by its own tiny std."""
    rewards = torch.as_tensor(rewards).double().flatten()
    groups = torch.as_tensor(groups).flatten().to(rewards.device)
    if rewards.shape != groups.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} differ in length")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf: the reward model returned non-finite values")
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    total = torch.zeros_like(count)
    count.index_add_(0, inverse, torch.ones_like(rewards))
    total.index_add_(0, inverse, rewards)
    group_mean = (total / count)[inverse]
    return (rewards - group_mean) / (rewards.std(unbiased=False) + eps)


def optimality_weights(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A, -clip, clip) / clip, in [0, 1]: the "optimality probability" of a sample."""
    if clip <= 0:
        raise ValueError(f"advantage clip must be > 0, got {clip}")
    return 0.5 + 0.5 * advantages.clamp(-clip, clip) / clip


# ------------------------------------------------------------------------------- loss
def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float):
    """(v+, v-) = ((1 - beta) v_old + beta v_theta, (1 + beta) v_old - beta v_theta)."""
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_target: torch.Tensor, r: torch.Tensor,
             beta: float = 1.0, form: str = "velocity", x_t: torch.Tensor | None = None,
             t: torch.Tensor | None = None, x0: torch.Tensor | None = None,
             min_weight: float = 1e-5) -> torch.Tensor:
    """Per-sample DiffusionNFT loss [B] = (r e(v+) + (1 - r) e(v-)) / beta (see the module docstring).

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


class NFTObjective:
    """One DiffusionNFT minibatch loss: ``objective(model, old_model, x0, y, r, generator, ref_model)``.

    Each clean sample x0 is noised at ``t_per_sample`` times with fresh eps; the old policy (and,
    with ``ref_weight > 0``, the frozen reference) are evaluated without gradient at the same (x_t, t).

    Args:
        process: must be :class:`~samplers.process.Flow` (the velocity eps - x0 is the target).
        beta: implicit-policy step.
        form: ``velocity`` | ``x0_adaptive`` (see :func:`nft_loss`).
        ref_weight: weight of mean ||v_theta - v_ref||^2 toward the frozen base (0 = off; the
            released code uses 1e-4).
        t_source: ``sampler`` draws t among ``times`` (the solver's evaluation times: the paper
            trains at the times its sampler visited); ``uniform`` draws t ~ U[t_min, t_max].
        times: the grid for ``t_source='sampler'`` (1-D, any order).
        t_per_sample: times per sample; with ``sampler`` they are distinct grid points
            (None = all of them, the paper's default).
    """

    def __init__(self, process: NoiseProcess, beta: float = 1.0, form: str = "velocity",
                 ref_weight: float = 1e-4, t_source: str = "sampler", times=None,
                 t_per_sample: int | None = 1, t_min: float = 1e-3, t_max: float = 1.0):
        if not isinstance(process, Flow):
            raise ValueError(f"DiffusionNFT needs a rectified-flow model (process Flow, prediction 'flow'); "
                             f"got process {process!r}")
        if form not in FORMS:
            raise ValueError(f"unknown NFT loss form {form!r}; expected one of {FORMS}")
        if t_source not in T_SOURCES:
            raise ValueError(f"unknown t_source {t_source!r}; expected one of {T_SOURCES}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if ref_weight < 0:
            raise ValueError(f"ref_weight must be >= 0, got {ref_weight}")
        self.process, self.beta, self.form, self.ref_weight = process, float(beta), form, float(ref_weight)
        self.t_source, self.t_min, self.t_max = t_source, float(t_min), float(t_max)
        self.times = None
        if t_source == "sampler":
            if times is None:
                raise ValueError("t_source='sampler' needs times= (the solver's evaluation times)")
            self.times = torch.as_tensor(times, dtype=torch.float32).flatten()
            if self.times.numel() < 1 or bool(((self.times <= 0) | (self.times > 1)).any()):
                raise ValueError(f"sampler times must lie in (0, 1], got {self.times.tolist()}")
        if t_per_sample is None:
            if self.times is None:
                raise ValueError("t_per_sample=None (all grid times) needs t_source='sampler'")
            t_per_sample = self.times.numel()
        if int(t_per_sample) < 1 or (self.times is not None and int(t_per_sample) > self.times.numel()):
            limit = "" if self.times is None else f" and <= the {self.times.numel()} sampler times"
            raise ValueError(f"t_per_sample must be >= 1{limit}, got {t_per_sample}")
        self.t_per_sample = int(t_per_sample)

    def draw_times(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """[n * K] times, sample-major (the K times of sample i are entries i*K .. i*K + K - 1)."""
        k = self.t_per_sample
        if self.t_source == "uniform":
            t = self.t_min + (self.t_max - self.t_min) * torch.rand(n * k, generator=generator, device=device)
            return t
        # K distinct grid points per sample: the first K of a random permutation of the grid
        keys = torch.rand(n, self.times.numel(), generator=generator, device=device)
        idx = keys.argsort(dim=1)[:, :k]
        return self.times.to(device)[idx].reshape(-1)

    def __call__(self, model, old_model, x0: torch.Tensor, y: torch.Tensor | None, r: torch.Tensor,
                 generator: torch.Generator, ref_model=None):
        """(scalar loss, logs dict of detached scalars)."""
        k = self.t_per_sample
        x0 = x0.repeat_interleave(k, dim=0)
        r = r.repeat_interleave(k, dim=0)
        cond = {} if y is None else {"y": y.repeat_interleave(k, dim=0)}
        t = self.draw_times(x0.shape[0] // k, generator, x0.device).to(x0.dtype)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.process.marginal(x0, eps, t)
        v_target = self.process.target(x0, eps, t, "flow")
        with torch.no_grad():
            v_old = old_model(x_t, t, **cond).float()
        v_theta = model(x_t, t, **cond).float()
        per_sample = nft_loss(v_theta, v_old, v_target.float(), r, self.beta, self.form, x_t.float(),
                              t.float(), x0.float())
        policy = per_sample.mean()
        loss = policy
        logs = {"policy_loss": policy.detach(),
                "old_deviation": ((v_theta.detach() - v_old) ** 2).mean()}
        if self.ref_weight > 0:
            if ref_model is None:
                raise ValueError("ref_weight > 0 needs ref_model= (the frozen base model)")
            with torch.no_grad():
                v_ref = ref_model(x_t, t, **cond).float()
            ref_term = ((v_theta - v_ref) ** 2).mean()
            loss = loss + self.ref_weight * ref_term
            logs["ref_deviation"] = ref_term.detach()
        return loss, logs


# ------------------------------------------------------------------------------- old policy
def old_decay(iteration: int, rate: float = 0.001, cap: float = 0.5, flat: int = 0) -> float:
    """d_k = 0 for k < flat, else min(rate (k - flat), cap): the paper's soft-update schedule
    (rate 0.001, cap 0.5 for one reward; its multi-reward runs use flat 75, rate 0.0075, cap 0.999)."""
    if iteration < flat:
        return 0.0
    return min(rate * (iteration - flat), cap)


class OldPolicy:
    """The sampling ("old") policy: a frozen copy of the model, softly pulled toward it.

        theta_old <- d_k theta_old + (1 - d_k) theta,   d_k = :func:`old_decay` (k)

    ``model`` is the frozen copy (eval mode, no gradients); call it like the trained model.
    """

    def __init__(self, model: nn.Module, rate: float = 0.001, cap: float = 0.5, flat: int = 0):
        if rate < 0 or not 0 <= cap < 1 or flat < 0:
            raise ValueError(f"old-policy schedule needs rate >= 0, 0 <= cap < 1, flat >= 0; got "
                             f"rate={rate}, cap={cap}, flat={flat}")
        self.rate, self.cap, self.flat = float(rate), float(cap), int(flat)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, iteration: int) -> float:
        return old_decay(iteration, self.rate, self.cap, self.flat)

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> float:
        """Soft update after iteration ``iteration`` (counted from 0); returns the decay used."""
        d = self.decay_at(iteration)
        new = model.state_dict()
        for name, old in self.model.state_dict().items():
            src = new[name].detach()
            if old.is_floating_point():
                old.lerp_(src.to(old.dtype), 1.0 - d)  # old + (1 - d)(new - old) = d old + (1 - d) new
            else:
                old.copy_(src)
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)
