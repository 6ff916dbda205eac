"""privimage.kernels: fused per-sample norm and clipped-accumulation ops (Triton), with torch references.

Every op the DP engine's layer rules need, one file each (kernel, launcher, torch path, ``*_ref``):

* :mod:`.per_sample_sq_norms`: ‖Σ_{r∈s} G_rᵀA_r‖² per sample without writing the product (Linear, Conv2d);
* :mod:`.ghost_sq_norms`: the same value as ⟨A_sA_sᵀ, G_sG_sᵀ⟩ in T×T tiles (ghost norms);
* :mod:`.clipped_weight_grad`: Σ_s c_s G_sᵀA_s as one GEMM with the clip factor applied in the kernel;
* :mod:`.norm_affine`: GroupNorm / LayerNorm per-sample affine gradients, x̂ formed on the fly.

Which implementation runs is decided in one place, :mod:`.dispatch` (Triton on CUDA or under
``TRITON_INTERPRET=1``; the native CPU build with ``PRIVIMAGE_NATIVE=1``; torch otherwise). Each op is a
registered custom op (``torch.ops.privimage.*``), so ``torch.compile(fullgraph=True)`` keeps it in the graph
(opaque: its torch path may sync with the host); eager calls run its implementation directly, without the
dispatcher's round trip.
Layer forms and per-row gradients materialised by torch: :mod:`.forms`; rows → samples and padding:
:class:`Grouping`.

* Linear: ``A`` (R, *, d) inputs, ``G`` (R, *, p) output gradients; extra dims are positions.
* Conv2d: ``x`` (R, C_in, H, W), ``grad_out`` (R, C_out, Ho, Wo) and the convolution's geometry.

Rows and samples: ``sample_index`` (R,) long maps rows to samples (a sample's gradient is the sum of its rows'),
``is_padding`` (R,) bool marks rows that count for nothing. Norms are (S,) float32 whatever the input dtype.
"""

from . import dispatch, native
from .clipped_weight_grad import (clipped_weight_grad, clipped_weight_grad_ref, conv_clipped_weight_grad,
                                  conv_clipped_weight_grad_ref)
from .dispatch import TRITON_AVAILABLE
from .forms import conv_per_row_grads, linear_per_row_grads
from .ghost_sq_norms import conv_ghost_sq_norms, conv_ghost_sq_norms_ref, ghost_sq_norms, ghost_sq_norms_ref
from .grouping import Grouping
from .norm_affine import group_norm_grads, group_norm_grads_ref, layer_norm_grads, layer_norm_grads_ref
from .per_sample_sq_norms import (conv_per_sample_sq_norms, conv_per_sample_sq_norms_ref, per_sample_sq_norms,
                                  per_sample_sq_norms_ref)

__all__ = [
    "Grouping", "TRITON_AVAILABLE",
    "clipped_weight_grad", "clipped_weight_grad_ref", "conv_clipped_weight_grad", "conv_clipped_weight_grad_ref",
    "conv_ghost_sq_norms", "conv_ghost_sq_norms_ref", "conv_per_row_grads", "conv_per_sample_sq_norms",
    "conv_per_sample_sq_norms_ref", "dispatch", "ghost_sq_norms", "ghost_sq_norms_ref", "group_norm_grads",
    "group_norm_grads_ref", "layer_norm_grads", "layer_norm_grads_ref", "linear_per_row_grads", "native",
    "per_sample_sq_norms", "per_sample_sq_norms_ref",
]
