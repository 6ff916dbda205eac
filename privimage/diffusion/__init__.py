"""EDM diffusion for DP training: preconditioning, per-row loss with noise multiplicity, samplers, EMA."""

from privimage.diffusion.edm import SIGMA_DATA, EDMDenoiser, EDMLoss, to_model_range, to_uint8
from privimage.diffusion.ema import EMA
from privimage.diffusion.sampling import (SamplerConfig, StackedRandomGenerator, sample, sample_in_batches,
                                          sigma_steps)

__all__ = ["EDMDenoiser", "EDMLoss", "EMA", "SIGMA_DATA", "SamplerConfig", "StackedRandomGenerator", "sample",
           "sample_in_batches", "sigma_steps", "to_model_range", "to_uint8"]
