"""privimage.kernels: fused per-sample norm and clipped-accumulation ops (Triton), with torch references.

Every op runs its Triton kernel on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``) and its plain-torch
``*_ref`` otherwise (:mod:`privimage.kernels._triton`); each is a registered torch custom op
(``torch.ops.privimage.*``), so ``torch.compile(fullgraph=True)`` keeps it in the graph. Layer forms:

* Linear: ``A`` (R, *, d) inputs, ``G`` (R, *, p) output gradients; extra dims are positions.
* Conv2d: ``x`` (R, C_in, H, W), ``grad_out`` (R, C_out, Ho, Wo) and the convolution's geometry.

Rows and samples: ``sample_index`` (R,) long maps rows to samples (a sample's gradient is the sum of its rows'),
``is_padding`` (R,) bool marks rows that count for nothing. Norms are (S,) float32 whatever the input dtype.

On CPU without the interpreter, ops run the optional native C++ build when it is built (:mod:`.native`),
else their references.
"""

from .clipped_weight_grad import (clipped_weight_grad, clipped_weight_grad_ref, conv_clipped_weight_grad,
                                  conv_clipped_weight_grad_ref)
from .ghost_sq_norms import conv_ghost_sq_norms, conv_ghost_sq_norms_ref, ghost_sq_norms, ghost_sq_norms_ref
from .norm_affine import (bias_clipped_grad, bias_clipped_grad_ref, bias_sq_norms, bias_sq_norms_ref,
                          group_norm_clipped_grads, group_norm_clipped_grads_ref, group_norm_grads,
                          group_norm_grads_ref, group_norm_sq_norms,
                          group_norm_sq_norms_ref, layer_norm_clipped_grads, layer_norm_clipped_grads_ref,
                          layer_norm_sq_norms, layer_norm_sq_norms_ref)
from .per_sample_sq_norms import (conv_per_sample_sq_norms, conv_per_sample_sq_norms_ref, per_sample_sq_norms,
                                  per_sample_sq_norms_ref)
from ._triton import TRITON_AVAILABLE, use_triton
from . import native  # the optional C++ build (loaded on first use, when built)

__all__ = [
    "TRITON_AVAILABLE",
    "bias_clipped_grad", "bias_clipped_grad_ref", "bias_sq_norms", "bias_sq_norms_ref",
    "clipped_weight_grad", "clipped_weight_grad_ref", "conv_clipped_weight_grad", "conv_clipped_weight_grad_ref",
    "conv_ghost_sq_norms", "conv_ghost_sq_norms_ref", "conv_per_sample_sq_norms", "conv_per_sample_sq_norms_ref",
    "ghost_sq_norms", "ghost_sq_norms_ref", "native",
    "group_norm_clipped_grads", "group_norm_clipped_grads_ref", "group_norm_grads", "group_norm_grads_ref",
    "group_norm_sq_norms", "group_norm_sq_norms_ref",
    "layer_norm_clipped_grads", "layer_norm_clipped_grads_ref", "layer_norm_sq_norms", "layer_norm_sq_norms_ref",
    "per_sample_sq_norms", "per_sample_sq_norms_ref",
    "use_triton",
]
