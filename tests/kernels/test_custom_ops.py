"""The ops as torch custom ops: schema/fake checks, torch.compile(fullgraph=True) graphs that contain them,
the dispatch switch, and the argument errors."""

import pytest
import torch

from privimage import kernels as K
from privimage.kernels import dispatch

OPS = ["per_sample_sq_norms", "ghost_sq_norms", "clipped_weight_grad", "norm_affine_grads"]


def _conv_args():
    x, go = torch.randn(3, 4, 6, 5), torch.randn(3, 6, 3, 3)
    return x, go, [3, 3], [2, 2], [1, 1], [1, 1], 2


def test_opcheck_schemas_and_fake_impls():
    x, go, ks, st, pd, dl, g = _conv_args()
    sample_index, pad = torch.tensor([0, 1, 0]), torch.tensor([False, False, True])
    ops = torch.ops.privimage
    torch.library.opcheck(ops.per_sample_sq_norms, (x, go, sample_index, pad, 2, ks, st, pd, dl, g))
    torch.library.opcheck(ops.ghost_sq_norms, (x, go, None, None, 3, ks, st, pd, dl, g))
    torch.library.opcheck(ops.clipped_weight_grad, (x, go, torch.rand(2), sample_index, pad, ks, st, pd, dl, g))
    y = torch.randn(3, 4, 5, 5)
    torch.library.opcheck(ops.norm_affine_grads, (y, torch.randn_like(y), sample_index, pad, 2, 2, 2, 1, 1e-5))


def test_compile_fullgraph_keeps_the_ops_in_the_graph():
    """A DP-style function (norms → clip factors → clipped sums) compiles as ONE graph holding the custom ops."""
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def dp_sums(x, go, A, G, gn_x, gn_g):
        sq = K.conv_per_sample_sq_norms(x, go, 3, stride=2, padding=1, groups=2)
        gn_w, gn_b = K.group_norm_grads(gn_x, gn_g, 2)
        sq = sq + K.ghost_sq_norms(A, G) + gn_w.square().sum(1) + gn_b.square().sum(1)
        c = (1.0 / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        return (K.conv_clipped_weight_grad(x, go, c, 3, stride=2, padding=1, groups=2),
                K.clipped_weight_grad(A, G, c), c @ gn_w, c @ gn_b, sq)

    x, go = torch.randn(3, 4, 6, 5), torch.randn(3, 6, 3, 3)
    A, G = torch.randn(3, 7, 5), torch.randn(3, 7, 2)
    gn_x = torch.randn(3, 4, 3, 3)
    args = (x, go, A, G, gn_x, torch.randn_like(gn_x))
    compiled = torch.compile(dp_sums, fullgraph=True, backend=backend)
    for got, want in zip(compiled(*args), dp_sums(*args)):
        torch.testing.assert_close(got, want)
    for op in OPS:
        assert f"privimage.{op}.default" in seen, f"{op} missing from the graph: {sorted(seen)}"


def test_switch_uses_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)
    x = torch.zeros(1)
    assert dispatch.backend("per_sample_sq_norms", x, native_pays=True) == dispatch.TORCH
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.backend("per_sample_sq_norms", x) == (dispatch.TRITON if dispatch.HAVE_TRITON else dispatch.TORCH)
    assert dispatch.backend("per_sample_sq_norms", x.double()) == dispatch.TORCH, "float64 never goes to Triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    A, G = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    torch.testing.assert_close(K.per_sample_sq_norms(A, G), K.per_sample_sq_norms_ref(A, G))


def test_forced_backend_is_scoped_and_refuses_what_cannot_run(monkeypatch):
    """dispatch.forced pins a backend for a block (benchmarks and tests compare backends through one op), and
    an op that cannot run on the pinned backend says so instead of silently running another."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    A, G = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    with dispatch.forced("torch"):
        assert dispatch.backend("ghost_sq_norms", A) == dispatch.TORCH
        torch.testing.assert_close(K.ghost_sq_norms(A, G), K.ghost_sq_norms_ref(A, G))
    assert dispatch.backend("ghost_sq_norms", A) == dispatch.TORCH
    with dispatch.forced("triton"), pytest.raises(RuntimeError, match="forced to 'triton'"):
        K.per_sample_sq_norms(A, G)
    with dispatch.forced("native"), pytest.raises(RuntimeError, match="forced to 'native'"):
        K.ghost_sq_norms(A, G)  # the native build has no ghost norms
    with pytest.raises(ValueError, match="cuda"):
        with dispatch.forced("cuda"):
            pass


@pytest.mark.parametrize("call, message", [
    (lambda: K.per_sample_sq_norms(torch.randn(3, 4, 5), torch.randn(3, 5, 2)), "must agree on every dim"),
    (lambda: K.per_sample_sq_norms(torch.randn(3, 4, 5), torch.randn(3, 4, 2).long()), "floating point"),
    (lambda: K.conv_per_sample_sq_norms(torch.randn(2, 4, 6, 5), torch.randn(2, 6, 6, 5), 3),
     "does not match the convolution"),
    (lambda: K.conv_ghost_sq_norms(torch.randn(2, 4, 6, 5), torch.randn(2, 6, 6, 5), 3, padding=1, groups=3),
     "must divide C_in=4"),
    (lambda: K.ghost_sq_norms(torch.randn(3, 2, 5), torch.randn(3, 2, 2), sample_index=torch.tensor([0, 1])),
     "LongTensor of shape \\(3,\\)"),
    (lambda: K.ghost_sq_norms(torch.randn(3, 2, 5), torch.randn(3, 2, 2), sample_index=torch.tensor([0, 1, 4]),
                              num_samples=2), "must lie in \\[0, num_samples=2\\)"),
    (lambda: K.per_sample_sq_norms(torch.randn(3, 2, 5), torch.randn(3, 2, 2), is_padding=torch.zeros(3)),
     "bool tensor of shape"),
    (lambda: K.clipped_weight_grad(torch.randn(3, 2, 5), torch.randn(3, 2, 2), torch.ones(2)),
     "one clip factor per sample"),
    (lambda: K.group_norm_grads(torch.randn(2, 6, 3), torch.randn(2, 6, 3), 4), "num_groups=4 must divide"),
    (lambda: K.layer_norm_grads(torch.randn(2, 6, 3), torch.randn(2, 6, 3), 6), "must have one shape"),
    (lambda: K.group_norm_grads(torch.randn(2, 6, 3), torch.randn(2, 6, 3), 3, is_padding=torch.zeros(2)),
     "bool tensor of shape"),
])
def test_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_interpreted_launch_leaves_triton_language_untouched(interpret):
    """An interpreted launch patches triton.language for its duration only: a process that then compiles
    kernels for a GPU (the whole suite on a GPU machine) must see the original functions."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    before = (tl.load, tl.core.load, tl.dot, tl.tensor.__add__, JITFunction.__call__)
    K.per_sample_sq_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    assert (tl.load, tl.core.load, tl.dot, tl.tensor.__add__, JITFunction.__call__) == before
