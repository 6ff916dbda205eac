"""The references against the slow, obviously right loop: one autograd backward per sample (float64).

For each sample s, its loss is Σ_{r∈s, r not padding} ⟨layer(x_r), G_r⟩, whose parameter gradient is exactly
the sample's gradient that the ops take norms of and clip-sum (G_r being the output gradient of row r).
"""

import pytest
import torch
import torch.nn.functional as F

from privimage import kernels as K

import kernel_cases as H


def loop_grads(forward, params, x, G, sample_index=None, is_padding=None, num_samples=None):
    """Per-sample gradients of Σ_{r∈s} ⟨forward(x_r), G_r⟩ w.r.t. params: one backward per sample."""
    R = G.shape[0]
    sample_index = torch.arange(R) if sample_index is None else sample_index
    S = R if num_samples is None else num_samples
    out = []
    for s in range(S):
        rows = [r for r in range(R) if sample_index[r] == s and not (is_padding is not None and is_padding[r])]
        if not rows:
            out.append([torch.zeros_like(p) for p in params])
            continue
        loss = (forward(x[rows]) * G[rows]).sum()
        out.append(list(torch.autograd.grad(loss, params)))
    return out  # [S][param]


def _sq(grads):
    return torch.stack([sum(g.square().sum() for g in gs) for gs in grads]) if grads else torch.zeros(0)


def _clipped(grads, c):
    return [sum(c[s] * grads[s][i] for s in range(len(grads))) for i in range(len(grads[0]))]


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.CONV_CASES)
def test_conv_refs(spec, kind):
    R, c_in, c_out, Hh, W, k, s, p, d, g = spec
    x, go, geometry = H.conv_case(spec)
    weight = torch.randn(c_out, c_in // g, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    kw = H.rows(kind, R)
    grads = loop_grads(lambda xr: F.conv2d(xr, weight, bias, stride=s, padding=p, dilation=d, groups=g),
                       [weight, bias], x, go, **kw)
    want_w = _sq([[gs[0]] for gs in grads])
    torch.testing.assert_close(K.conv_per_sample_sq_norms_ref(x, go, **geometry, **kw), want_w)
    torch.testing.assert_close(K.conv_ghost_sq_norms_ref(x, go, **geometry, **kw), want_w)
    c = torch.rand(len(grads), dtype=torch.float64)
    want = _clipped(grads, c)
    kw.pop("num_samples", None)
    torch.testing.assert_close(K.conv_clipped_weight_grad_ref(x, go, c, **geometry, **kw), want[0])


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_refs(spec, kind):
    A, G = H.linear_case(spec)
    lin = torch.nn.Linear(A.shape[-1], G.shape[-1], dtype=torch.float64)
    kw = H.rows(kind, A.shape[0])
    grads = loop_grads(lin, [lin.weight, lin.bias], A, G, **kw)
    want_w = _sq([[gs[0]] for gs in grads])
    torch.testing.assert_close(K.per_sample_sq_norms_ref(A, G, **kw), want_w)
    torch.testing.assert_close(K.ghost_sq_norms_ref(A, G, **kw), want_w)
    c = torch.rand(len(grads), dtype=torch.float64)
    want = _clipped(grads, c)
    kw.pop("num_samples", None)
    torch.testing.assert_close(K.clipped_weight_grad_ref(A, G, c, **kw), want[0])


@pytest.mark.parametrize("kind", ["plain", "multi-row", "padding"])
def test_group_norm_refs(kind):
    x = torch.randn(7, 6, 5, 3, dtype=torch.float64) * 2 + 1
    G = torch.randn_like(x)
    gn = torch.nn.GroupNorm(3, 6, dtype=torch.float64)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.normal_()
    kw = H.rows(kind, 7)
    grads = loop_grads(gn, [gn.weight, gn.bias], x, G, **kw)
    for i, got in enumerate(K.group_norm_grads_ref(x, G, 3, **kw)):
        torch.testing.assert_close(got, torch.stack([gs[i] for gs in grads]))


@pytest.mark.parametrize("kind", ["plain", "multi-row", "padding"])
def test_layer_norm_refs(kind):
    x = torch.randn(5, 4, 2, 3, dtype=torch.float64)
    G = torch.randn_like(x)
    ln = torch.nn.LayerNorm((2, 3), dtype=torch.float64)
    kw = H.rows(kind, 5)
    grads = loop_grads(ln, [ln.weight, ln.bias], x, G, **kw)
    for i, got in enumerate(K.layer_norm_grads_ref(x, G, (2, 3), **kw)):
        torch.testing.assert_close(got, torch.stack([gs[i] for gs in grads]))


BLOCK_CASES = H.CONV_CASES + [pytest.param((2, 70, 3, 3, 4, 3, 1, 1, 1, 1), id="c70-chunked-on-cpu"),
                               pytest.param((35, 2, 3, 3, 2, 3, 1, 1, 1, 1), id="s35-sample-chunks-on-cpu"),
                               pytest.param((3, 4, 6, 5, 7, 1, 2, 0, 1, 2), id="1x1-stride2-groups2"),
                               pytest.param((35, 3, 2, 4, 4, 1, 1, 0, 1, 1), id="1x1-s35")]


@pytest.mark.parametrize("k, layout", [(1, "tiled")] + [(k, layout) for k in (2, 3)
                                                         for layout in ("tiled", "adjacent", "shuffled")])
@pytest.mark.parametrize("spec", BLOCK_CASES)
def test_conv_per_sample_grads_by_blocks(spec, k, layout):
    """conv_per_row_grads(blocks=k) on Grouping.blocks' rows: each sample's gradient, its k rows' sum (the
    loop's), for the rows tiled [0..S-1, 0..S-1, ...], adjacent [0, 0, 1, 1, ...] or shuffled; k = 1: each
    row's gradient."""
    S, c_in, c_out, Hh, W, ks, s, p, d, g = spec
    spec_rows = (S * k, c_in, c_out, Hh, W, ks, s, p, d, g)
    x, go, geometry = H.conv_case(spec_rows)
    ids = {"tiled": torch.arange(S).repeat(k), "adjacent": torch.arange(S).repeat_interleave(k),
           "shuffled": torch.arange(S).repeat(k)[torch.randperm(S * k, generator=torch.Generator().manual_seed(1))]}
    sample_index = ids[layout]
    grouping = K.Grouping(sample_index if k > 1 else None, S * k)
    grouping.resolve()
    if S > 1 and k > 1:  # one sample: every layout is tiled
        assert (grouping.block_order is None) == (layout == "tiled")
    weight = torch.randn(c_out, c_in // g, ks, ks, dtype=torch.float64, requires_grad=True)
    want = loop_grads(lambda xr: F.conv2d(xr, weight, stride=s, padding=p, dilation=d, groups=g), [weight], x, go,
                      sample_index=sample_index, num_samples=S)
    blocks = grouping.blocks if k > 1 else (lambda t: t)
    got = K.conv_per_row_grads(blocks(x), blocks(go), (ks, ks), (s, s), (p, p), (d, d), g, blocks=k)
    torch.testing.assert_close(got, torch.stack([w[0] for w in want]))


def test_blocks_refuse_ragged_or_one_row_groupings():
    with pytest.raises(ValueError, match="same number k > 1"):
        K.Grouping(torch.tensor([0, 1, 1]), 3).blocks(torch.zeros(3))
    with pytest.raises(ValueError, match="same number k > 1"):
        K.Grouping(None, 3).blocks(torch.zeros(3))
    with pytest.raises(ValueError, match="blocks=2 must divide the 3 rows"):
        K.conv_per_row_grads(torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2), (1, 1), (1, 1), (0, 0), (1, 1), 1,
                             blocks=2)
