"""The GAN generator of PRIVIMAGE+G: hinge losses paired per record, fakes from each record's secret draws
(:mod:`privimage.randomness`), sampling.

The networks are in :mod:`privimage.models.gan`; the training loops beside the diffusion ones in
:mod:`privimage.train.gan_pretrain` and :mod:`privimage.train.gan_finetune`.
"""

from privimage.gan.losses import d_hinge, g_hinge, pair_groups, paired_rows
from privimage.gan.sampling import sample_gan, sample_gan_in_batches, save_gan_grid
from privimage.gan.steps import generate, generator_update, record_fakes

__all__ = ["d_hinge", "g_hinge", "generate", "generator_update", "pair_groups", "paired_rows", "record_fakes",
           "sample_gan", "sample_gan_in_batches", "save_gan_grid"]
