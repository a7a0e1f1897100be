"""Property tests of the time grids: steps+1 points, strictly decreasing, exact endpoints, and the
defining property of each schedule."""

from __future__ import annotations

import math

import pytest
import torch

from difftools.process import EDM, VP, Flow
from samplers.schedules import SCHEDULES, get_times, karras, logsnr, quadratic, uniform_t

PROCESSES = [VP(), VP("cosine"), Flow(), EDM()]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("steps", [1, 4, 17])
def test_grid_properties(name, process, steps):
    t_start, t_end = (1.0, 1e-3) if not isinstance(process, EDM) else (1.0, process.t_min)
    times = get_times(process, name, steps, t_start, t_end)
    assert times.dtype == torch.float64
    assert times.numel() == steps + 1
    assert float(times[0]) == t_start and float(times[-1]) == t_end
    assert bool((times[1:] < times[:-1]).all())


def test_logsnr_is_uniform_in_lambda():
    p = VP()
    lam = p.lambda_(logsnr(p, 12, 1.0, 1e-3))
    assert torch.allclose(
        torch.diff(lam), torch.full((12,), float(lam[1] - lam[0]), dtype=torch.float64), atol=1e-9
    )


def test_logsnr_flow_from_one_starts_at_lambda_min():
    p = Flow()
    times = logsnr(p, 8, 1.0, 1e-3)
    lam = p.lambda_(times[1:])
    assert float(times[0]) == 1.0
    step = (float(p.lambda_(torch.tensor(1e-3, dtype=torch.float64))) + 7.0) / 8
    assert abs(float(lam[0]) - (-7.0 + step)) < 1e-9
    assert torch.allclose(torch.diff(lam), torch.full((7,), step, dtype=torch.float64), atol=1e-9)


def test_karras_rho():
    p = EDM()
    times = karras(p, 10, 1.0, p.t_min, rho=7.0)
    s = p.sigma(times)  # alpha = 1 for EDM, so sigma/alpha = sigma
    ramp = s ** (1 / 7)
    assert torch.allclose(
        torch.diff(ramp), torch.full((10,), float(ramp[1] - ramp[0]), dtype=torch.float64), atol=1e-12
    )
    assert abs(float(s[0]) - 80.0) < 1e-9 and abs(float(s[-1]) - 0.002) < 1e-12


def test_uniform_and_quadratic():
    p = VP()
    assert torch.allclose(
        uniform_t(p, 4, 1.0, 0.2), torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64)
    )
    q = quadratic(p, 4, 1.0, 0.0 + 1e-3)
    assert math.isclose(float(q[2]), 1e-3 + (1 - 1e-3) * 0.25, rel_tol=1e-12)


def test_custom_and_invalid():
    p = VP()
    t = torch.tensor([0.9, 0.5, 0.1])
    assert torch.equal(get_times(p, t), t.double())
    with pytest.raises(ValueError):
        get_times(p, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError):
        get_times(p, "nope")
    with pytest.raises(ValueError):
        uniform_t(p, 0)
