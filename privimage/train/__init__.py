"""Training loops: non-private pre-training on the public subset and DP-SGD fine-tuning on sensitive data, for the
UNet (``pretrain``, ``finetune``) and the GAN (``pretrain_gan``, ``finetune_gan``)."""

from privimage.train.common import load_checkpoint, resolve_device, save_checkpoint
from privimage.train.finetune import accumulate_micro_batch, finetune
from privimage.train.gan_finetune import finetune_gan
from privimage.train.gan_pretrain import pretrain_gan, pretrained_init
from privimage.train.pretrain import pretrain

__all__ = ["accumulate_micro_batch", "finetune", "finetune_gan", "load_checkpoint", "pretrain", "pretrain_gan",
           "pretrained_init", "resolve_device", "save_checkpoint"]
