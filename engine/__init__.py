"""privimage.engine: DP-SGD for any PyTorch model.

Poisson sampling, per-sample clipping, Gaussian noise and privacy accounting, with no knowledge of images
or diffusion: usable alone in anyone's DP training code. Modules, in the order a step uses them:

* :mod:`.sampling`: Poisson sampling into fixed-size physical batches with a padding mask;
* :mod:`.dp_sgd`: :class:`DPEngine`, the mechanism (Abadi et al.'s algorithm), stage by stage:
  :mod:`.capture` (inputs and output gradients of every layer, one backward), :mod:`.plan` (each layer's way
  to its per-sample norms, by a cost model), :mod:`.layers` (the per-layer rules), :mod:`.clipping` (norms,
  clip factors, clipped sums), :mod:`.compiled` (the same as compiled regions), :mod:`.loop` (the reference
  method), :mod:`.noise` (the Gaussian mechanism);
* :mod:`.distributed`: the same step over a torch.distributed group (``DPEngine(..., process_group=...)``);
* :mod:`.optimizer` (``make_private``), :mod:`.checker` (``check_per_sample_norms``);
* :mod:`.accounting` (ε of compositions, σ calibration), :mod:`.budget` (the plan and ledger of one (ε, δ)).
"""

from privimage.engine.accounting import (
    EpsilonReport,
    Mechanism,
    PlannedComposition,
    calibrate_noise_multiplier,
    compose_epsilon,
    compute_epsilon,
)
from privimage.engine.budget import BudgetExceededError, PrivacyBudget
from privimage.engine.checker import NormCheck, check_per_sample_norms
from privimage.engine.dp_sgd import DPEngine, StepStats
from privimage.engine.noise import ClippedSum, add_gaussian_noise, secure_generator
from privimage.engine.optimizer import DPOptimizer, make_private
from privimage.engine.plan import NORM_STRATEGIES, CostModel
from privimage.engine.sampling import LogicalBatch, PhysicalBatch, PoissonSampler

__all__ = [
    "BudgetExceededError",
    "ClippedSum",
    "CostModel",
    "DPEngine",
    "DPOptimizer",
    "EpsilonReport",
    "LogicalBatch",
    "Mechanism",
    "NORM_STRATEGIES",
    "NormCheck",
    "PhysicalBatch",
    "PlannedComposition",
    "PoissonSampler",
    "PrivacyBudget",
    "StepStats",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "check_per_sample_norms",
    "compose_epsilon",
    "compute_epsilon",
    "make_private",
    "secure_generator",
]
