"""difftools' sampler library: training-free fast samplers for any diffusion model.

The bottom layer of the project: it needs only torch (diffusers is imported lazily by the
adapters) and imports nothing from :mod:`difftools`. The noise processes live here too
(:mod:`samplers.process`, re-exported as :mod:`difftools.process`)::

    from samplers.process import VP, Flow, EDM
    from samplers import ModelFn, sample
    mf = ModelFn(net, VP(), prediction="eps")
    x0 = sample(mf, torch.randn(16, 3, 32, 32), solver="dpmpp_2m", steps=10)
"""

from samplers.model import ModelFn
from samplers.sampling import sample
from samplers.search import SolverSchedule, search

__all__ = ["ModelFn", "SolverSchedule", "sample", "search"]
