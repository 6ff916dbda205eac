"""privimage: differentially private synthetic image generation (PrivImage, Li et al., arXiv 2311.12850).

The distribution holds three layers, imported one way only:
``privimage.kernels`` (fused per-sample norm ops) <- ``privimage.engine`` (DP-SGD, sampling, noise,
accounting; usable alone in any training code) <- ``privimage`` (data, semantic query, models, training,
evaluation, the ``privimage`` command).
"""

__version__ = "0.1.0"
