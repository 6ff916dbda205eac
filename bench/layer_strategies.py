"""Per layer of the UNet, with K rows per sample: fused norm kernels vs grouped-conv materialisation vs ghost.

The data for the engine's per-layer plan (which way to take each layer's per-sample norm when a sample spans
K rows, as in every fine-tune). Each Conv2d, Linear and GroupNorm of the UNet (``--preset``) is measured with
the input and output gradient it has in the fine-tune: one forward and backward of the EDM loss at
``--samples`` images × ``--k`` rows, under bf16 autocast on CUDA (``--dtype``), captures them (one layer of
each distinct shape and geometry; ``count`` says how many share it), measured heaviest first (R·T·d·p), so a
run stopped by a time cap has the layers that matter most. Per layer, each sample's squared
weight-gradient norm (S,) by:

* ``fused``: ``privimage.kernels``' ``conv_per_sample_sq_norms`` / ``per_sample_sq_norms`` /
  ``group_norm_grads`` with ``sample_index``: rows summed into samples inside the kernel, nothing
  materialised (Triton on CUDA; elsewhere the op's torch reference, ``provider`` says which);
* ``ghost``: ``conv_ghost_sq_norms`` / ``ghost_sq_norms`` with ``sample_index`` (T×T Gram tiles);
* ``materialise``: the engine's torch path: per-row gradients (one grouped convolution,
  ``privimage.kernels.conv_per_row_grads``; a bmm for Linear; the GroupNorm affine reductions), summed
  per sample, squared;

and the clipped sum Σ_s c_s ∇W_s: ``clipped-fused`` (``conv_clipped_weight_grad`` / ``clipped_weight_grad``)
against ``clipped-torch`` (its ``*_ref``: one weight-gradient GEMM with c folded into G). Time: median of
up to ``--repeats`` after two warm-up calls (fewer for a call slower than 50 ms, so one slow layer cannot
take the run's time; ``harness.time_steps``); memory: the peak growth during the first call
(``harness.PeakMemory``, CUDA only). Ghost norms are skipped (with the reason) where their T²-cost is over 64×
the materialised one: at 32×32 with K = 8 rows folded into one sample's positions they would take seconds a
call. Each strategy's norms are compared with the materialised ones (``max_rel_diff``), so a wrong kernel
shows here too.

    python bench/layer_strategies.py --device cuda --samples 256 --k 8 --json layers.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import workload  # noqa: E402

from privimage import kernels as K  # noqa: E402
from privimage.kernels.forms import sq_norms_of  # noqa: E402


def capture(den, bt) -> list[dict]:
    """(module, input, output gradient) of the first layer of each distinct signature, from one forward and
    backward of the batch's loss; inputs in the dtype the layer computed in."""
    layers, seen, handles = [], {}, []

    def signature(m, a, out):
        geometry = (m.kernel_size, m.stride, m.padding, m.dilation, m.groups) if isinstance(m, nn.Conv2d) else ()
        groups = (m.num_groups,) if isinstance(m, nn.GroupNorm) else ()
        return type(m).__name__, tuple(a.shape), tuple(out.shape), geometry, groups

    def hook(name):
        def fn(m, inputs, out):
            key = signature(m, inputs[0], out)
            if key in seen:
                seen[key]["count"] += 1
                return
            entry = seen[key] = {"name": name, "module": m, "a": inputs[0].detach(), "count": 1}
            layers.append(entry)
            out.register_hook(lambda g: entry.__setitem__("g", g.detach()))
        return fn

    for name, m in den.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        bt.per_row_loss(den).sum().backward()
    finally:
        for h in handles:
            h.remove()
    for entry in layers:  # A in the dtype of G, as the engine's ops see them (autocast computed in it)
        entry["a"] = entry["a"].to(entry["g"].dtype)
    return [e for e in layers if "g" in e]


def strategies(entry, idx, S) -> dict:
    """name -> a zero-argument function computing that strategy's result for this layer."""
    m, a, g = entry["module"], entry["a"], entry["g"]
    rows = dict(sample_index=idx, num_samples=S)
    c = torch.rand(S, device=a.device)

    def to_samples(per_row):
        return sq_norms_of(per_row.new_zeros((S, *per_row.shape[1:])).index_add_(0, idx, per_row))

    if isinstance(m, nn.Conv2d):
        geo = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        return {"fused": lambda: K.conv_per_sample_sq_norms(a, g, m.kernel_size, **geo, **rows),
                "ghost": lambda: K.conv_ghost_sq_norms(a, g, m.kernel_size, **geo, **rows),
                "materialise": lambda: to_samples(K.conv_per_row_grads(a, g, m.kernel_size, m.stride, m.padding,
                                                                       m.dilation, m.groups)),
                "clipped-fused": lambda: K.conv_clipped_weight_grad(a, g, c, m.kernel_size, **geo, sample_index=idx),
                "clipped-torch": lambda: K.conv_clipped_weight_grad_ref(a, g, c, m.kernel_size, **geo,
                                                                        sample_index=idx)}
    if isinstance(m, nn.Linear):
        A, G = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        return {"fused": lambda: K.per_sample_sq_norms(A, G, **rows),
                "ghost": lambda: K.ghost_sq_norms(A, G, **rows),
                "materialise": lambda: to_samples(torch.bmm(G.transpose(1, 2), A)),
                "clipped-fused": lambda: K.clipped_weight_grad(A, G, c, sample_index=idx),
                "clipped-torch": lambda: K.clipped_weight_grad_ref(A, G, c, sample_index=idx)}
    gn = dict(eps=m.eps)

    def torch_rows():  # the engine's path on a CPU: per-row (∇γ, ∇β) by the op's torch code
        with K.dispatch.forced("torch"):
            return K.group_norm_grads(a, g, m.num_groups, **gn)

    return {"fused": lambda: sum(sq_norms_of(t) for t in K.group_norm_grads(a, g, m.num_groups, **gn, **rows)),
            "materialise": lambda: sum(to_samples(t) for t in torch_rows()),
            "clipped-fused": lambda: tuple(c @ t for t in K.group_norm_grads(a, g, m.num_groups, **gn, **rows)),
            "clipped-torch": lambda: tuple(c @ t for t in K.group_norm_grads_ref(a, g, m.num_groups, **gn, **rows))}


def ghost_cost_ratio(entry, k: int) -> float | None:
    """S·(K·T)²·(d+p) / (R·T·d·p): ghost norms' cost over the materialised one (None for GroupNorm)."""
    m, a, g = entry["module"], entry["a"], entry["g"]
    if isinstance(m, nn.Conv2d):
        T = g[0, 0].numel()
        d, p = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1], m.out_channels // m.groups
    elif isinstance(m, nn.Linear):
        T, d, p = a[0].numel() // a.shape[-1], m.in_features, m.out_features
    else:
        return None
    return (k * T) * (d + p) / (d * p)


def weight(entry) -> int:
    """The materialised per-row weight gradients' multiply-adds, R·T·d·p (GroupNorm: its input's size)."""
    m, a, g = entry["module"], entry["a"], entry["g"]
    if isinstance(m, nn.Conv2d):
        return g.numel() * m.weight[0].numel()
    if isinstance(m, nn.Linear):
        return g.numel() * m.in_features
    return a.numel()


def _rel_diff(x, ref) -> float:
    x = torch.cat([t.flatten() for t in x]) if isinstance(x, tuple) else x
    ref = torch.cat([t.flatten() for t in ref]) if isinstance(ref, tuple) else ref
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def measure(entry, idx, S, args) -> dict:
    a, g, m = entry["a"], entry["g"], entry["module"]
    row = {"name": entry["name"], "kind": type(m).__name__, "count": entry["count"], "a": list(a.shape),
           "g": list(g.shape), "dtype": str(g.dtype).replace("torch.", ""),
           "provider": "triton" if K.dispatch.backend("layer_strategies", a) == K.dispatch.TRITON else "torch reference"}
    if isinstance(m, nn.Conv2d):
        row["geometry"] = f"k={tuple(m.kernel_size)} s={tuple(m.stride)} p={tuple(m.padding)}"
    results, out = {}, {}
    ghost_ratio = ghost_cost_ratio(entry, args.k)
    for name, fn in strategies(entry, idx, S).items():
        if name == "ghost" and ghost_ratio > 64:
            out[name] = {"skipped": f"ghost would cost {ghost_ratio:.0f}x the materialised norms"}
            continue
        try:
            t0 = time.perf_counter()
            with harness.PeakMemory(args.device) as mem:
                results[name] = fn()  # the first call also compiles and autotunes a Triton kernel
            first = time.perf_counter() - t0
            one = harness.time_steps(fn, warmup=0, repeats=1, device=args.device)["median_ms"] / 1e3
            repeats = max(2, min(args.repeats, int(0.05 * args.repeats / max(one, 1e-9))))
            t = harness.time_steps(fn, warmup=0, repeats=repeats, device=args.device)
            out[name] = {"median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                         "repeats": repeats, "first_ms": 1e3 * first,
                         "peak_mb": mem.mb if torch.device(args.device).type == "cuda" else None}
        except Exception as e:  # one strategy failing on a layer is a result
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    for name in ("fused", "ghost"):
        if name in results and "materialise" in results:
            out[name]["max_rel_diff"] = _rel_diff(results[name], results["materialise"])
    if "clipped-fused" in results and "clipped-torch" in results:
        out["clipped-fused"]["max_rel_diff"] = _rel_diff(results["clipped-fused"], results["clipped-torch"])
    norms = {k: v["median_ms"] for k, v in out.items() if k in ("fused", "ghost", "materialise") and "median_ms" in v}
    row["strategies"], row["fastest_norm"] = out, min(norms, key=norms.get) if norms else None
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="s")
    ap.add_argument("--resolution", type=int, default=None, help="override the preset's image size (smoke runs)")
    ap.add_argument("--samples", type=int, default=256, help="images (samples) per physical batch")
    ap.add_argument("--k", type=int, default=8, help="rows per sample")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 (autocast) on CUDA, float32 on the CPU")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="default: layer_strategies.json in the results folder")
    args = ap.parse_args(argv)
    dtype = workload.parse_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    overrides = {"resolution": args.resolution} if args.resolution else {}
    den = workload.denoiser(args.preset, device=args.device, **overrides)
    bt = workload.batch(args.samples, k=args.k, resolution=den.net.config.resolution, device=args.device,
                        dtype=dtype)
    layers = sorted(capture(den, bt), key=weight, reverse=True)
    path = args.json or harness.results_dir() / "layer_strategies.json"
    result = {"meta": harness.environment(args.device, preset=args.preset, samples=args.samples, k=args.k,
                                          rows=bt.rows, dtype=str(dtype).replace("torch.", ""),
                                          repeats=args.repeats), "layers": []}
    print(f"{len(layers)} distinct layers of UNet {args.preset!r} at {args.samples} samples x {args.k} rows")
    for entry in layers:
        row = measure(entry, bt.groups, args.samples, args)
        result["layers"].append(row)
        harness.write_json(path, result)
        cells = ", ".join(f"{k} {v['median_ms']:.3g} ms" if "median_ms" in v else f"{k} {next(iter(v))}"
                          for k, v in row["strategies"].items())
        print(f"{row['name']:>28} {row['kind']:>9} {str(row['a']):>22}: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
