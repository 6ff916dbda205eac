"""The compiled Triton kernels on CUDA at UNet layer shapes (skipped with a reason without a GPU)."""

import pytest
import torch

from privimage import kernels as K

import kernel_cases as H

# (R, C_in, C_out, H, W, kernel, stride, padding, dilation, groups): 32×32 / 16×16 / 8×8 UNet levels
UNET = [(64, 64, 64, 32, 32, 3, 1, 1, 1, 1), (64, 128, 128, 16, 16, 3, 1, 1, 1, 1),
        (64, 128, 128, 8, 8, 3, 1, 1, 1, 1), (64, 64, 128, 32, 32, 3, 2, 1, 1, 1), (64, 128, 384, 8, 8, 1, 1, 0, 1, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", H.DTYPES)
@pytest.mark.parametrize("spec", UNET)
def test_conv_ops_on_cuda(monkeypatch, spec, dtype, atol):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, go, geometry = H.conv_case(spec, dtype)
    x, go = x.cuda(), go.cuda()
    x64, go64 = x.double(), go.double()
    c = torch.rand(x.shape[0], device="cuda")
    for op, ref in [(K.conv_per_sample_sq_norms, K.conv_per_sample_sq_norms_ref),
                    (K.conv_ghost_sq_norms, K.conv_ghost_sq_norms_ref)]:
        H.assert_within(op(x, go, **geometry), ref(x, go, **geometry), ref(x64, go64, **geometry), atol, op.__name__)
    H.assert_within(K.conv_clipped_weight_grad(x, go, c, **geometry),
                    K.conv_clipped_weight_grad_ref(x, go, c, **geometry),
                    K.conv_clipped_weight_grad_ref(x64, go64, c.double(), **geometry), atol, "clipped")
    for o, same, ref64 in zip(K.group_norm_grads(x, x, 8), K.group_norm_grads_ref(x, x, 8),
                              K.group_norm_grads_ref(x64, x64, 8)):
        H.assert_within(o, same, ref64, atol, "group norm")
