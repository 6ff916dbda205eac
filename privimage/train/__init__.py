"""Training loops: non-private pre-training on the public subset and DP-SGD fine-tuning on sensitive data."""

from privimage.train.common import load_checkpoint, resolve_device, save_checkpoint
from privimage.train.finetune import accumulate_micro_batch, finetune
from privimage.train.pretrain import pretrain

__all__ = ["accumulate_micro_batch", "finetune", "load_checkpoint", "pretrain", "resolve_device", "save_checkpoint"]
