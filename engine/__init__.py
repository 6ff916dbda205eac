"""privimage.engine: DP-SGD for any PyTorch model.

Poisson sampling, per-sample clipping, Gaussian noise and privacy accounting, with no knowledge of images
or diffusion: usable alone in anyone's DP training code.
"""

from privimage.engine.noise import ClippedSum, add_gaussian_noise, secure_generator

__all__ = ["ClippedSum", "add_gaussian_noise", "secure_generator"]
