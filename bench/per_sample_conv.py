"""Per-sample convolution weight gradients on CPU: the engine's grouped convolution against the alternatives.

For each convolution of a GAN discriminator (``--preset``, at ``--pairs`` real/fake pairs: 2·pairs rows, a
sample being one pair, row j·S + s being sample s's j-th row as ``Grouping.blocks`` lays them out), one
forward and backward of the paired hinge loss records the layer's input A and output gradient G; then each
sample's weight gradient ∇W_s = Σ_{rows of s} Σ_t G_{r,t} A_{r,t}ᵀ is formed (one layer per distinct
signature, :func:`layer_strategies.capture`; the totals count each signature's layers) by:

* ``grouped`` (the engine: :func:`privimage.kernels.conv_per_row_grads` with ``blocks=2``): one grouped
  convolution whose groups are the samples and whose batch is the two rows of each pair;
* ``grouped-channels-last``: the same call on channels-last copies of A and G;
* ``unfold-bmm``: im2col (``F.unfold``) then one batched GEMM per sample over its 2·T positions;
* ``shifted-bmm`` (3×3, stride 1, padding 1 only): no im2col; for each of the k² kernel offsets, one batched
  GEMM of G against a shifted window of the zero-padded input, the padded width's extra columns matched by
  zero columns of G (a contiguous slice per offset, so no copy of A);

against the non-private weight gradient of the same rows (``plain``: ``torch.nn.grad.conv2d_weight``, one
GEMM over all rows): the floor any per-sample method is compared with. Every method's result is checked
against ``grouped`` (max abs difference). Time: median process CPU time of ``--repeats`` calls after two
warm-ups (``harness.time_steps``), one torch thread unless ``OMP_NUM_THREADS`` says otherwise.

    python bench/per_sample_conv.py --preset demo --pairs 100   # the demo discriminator at its config's batch

Results: ``bench/results/per_sample_conv.json`` and ``.md`` (device, versions, git sha, date, command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import layer_strategies  # noqa: E402

from privimage.gan import generate, paired_rows  # noqa: E402
from privimage.kernels import conv_per_row_grads  # noqa: E402
from privimage.models import GAN_PRESETS, Discriminator, Generator  # noqa: E402

METHODS = ("plain", "grouped", "grouped-channels-last", "unfold-bmm", "shifted-bmm")


def capture(preset: str, pairs: int) -> list[dict]:
    """The discriminator's convolutions, one per distinct signature (``count`` says how many share it), each
    with its input A and output gradient G from one paired hinge-loss backward (:func:`layer_strategies.capture`)."""
    gan = GAN_PRESETS[preset]
    torch.manual_seed(0)
    G_net, D = Generator(gan), Discriminator(gan)
    x = torch.rand(pairs, gan.in_channels, gan.resolution, gan.resolution) * 2 - 1
    y = torch.randint(gan.num_classes, (pairs,))
    with torch.no_grad():
        fake = generate(G_net, torch.randn(pairs, gan.z_dim), y)
    batch = SimpleNamespace(per_row_loss=lambda model: paired_rows(model, x, y, fake, y))
    return [e for e in layer_strategies.capture(D, batch) if isinstance(e["module"], nn.Conv2d)]


def _unfold_bmm(a, g, m: nn.Conv2d, S: int):
    cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (R, K, T)
    K, T = cols.shape[1:]
    cols = cols.view(2, S, K, T).permute(1, 0, 3, 2).reshape(S, 2 * T, K)
    grads = g.view(2, S, g.shape[1], T).permute(1, 2, 0, 3).reshape(S, g.shape[1], 2 * T)
    return torch.bmm(grads, cols)


def _shifted_bmm(a, g, m: nn.Conv2d, S: int):
    k = m.kernel_size[0]
    R, c_in, H, W = a.shape
    Wp = W + 2
    flat = F.pad(a, (1, 1, 1, 2)).flatten(2)  # one extra bottom row keeps the last offset's slice in bounds
    L = H * Wp
    gp = F.pad(g, (0, 2)).flatten(2).view(2, S, g.shape[1], L)  # zero columns under the padded width
    out = a.new_empty(k, k, S, g.shape[1], c_in)
    for i in range(k):
        for j in range(k):
            window = flat[:, :, i * Wp + j:i * Wp + j + L].view(2, S, c_in, L)
            acc = torch.bmm(gp[0], window[0].transpose(1, 2))
            out[i, j] = acc.baddbmm_(gp[1], window[1].transpose(1, 2))
    return out.permute(2, 3, 4, 0, 1)


def methods_for(m: nn.Conv2d, a, g):
    S = a.shape[0] // 2
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    grouped = lambda x, y: conv_per_row_grads(x, y, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                                              dtype=torch.float32, blocks=2)
    out = {"plain": lambda: torch.nn.grad.conv2d_weight(a, m.weight.shape, g, **kw),
           "grouped": lambda: grouped(a, g),
           "grouped-channels-last": lambda: grouped(a.contiguous(memory_format=torch.channels_last),
                                                    g.contiguous(memory_format=torch.channels_last))}
    if m.groups == 1 and m.dilation == (1, 1):
        out["unfold-bmm"] = lambda: _unfold_bmm(a, g, m, S)
    if m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1) and m.groups == 1 and m.dilation == (1, 1):
        out["shifted-bmm"] = lambda: _shifted_bmm(a, g, m, S)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=sorted(GAN_PRESETS))
    ap.add_argument("--pairs", type=int, default=100, help="real/fake pairs (samples); rows are twice that")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for entry in capture(args.preset, args.pairs):
        m, a, g = entry["module"], entry["a"], entry["g"]
        fns = methods_for(m, a, g)
        ref = fns["grouped"]().reshape(a.shape[0] // 2, -1)
        row = {"layer": entry["name"], "count": entry["count"], "A": list(a.shape), "G": list(g.shape),
               "kernel": list(m.kernel_size)}
        for method, fn in fns.items():
            t = harness.time_steps(fn, warmup=2, repeats=args.repeats, device="cpu")
            row[method] = t["cpu_median_ms"]
            if method != "plain":
                row[f"{method}_max_abs_diff"] = float((fn().reshape(ref.shape) - ref).abs().max())
        rows.append(row)
        print(entry["name"], {k: round(row[k], 2) for k in METHODS if k in row}, flush=True)
    # over every convolution (each signature times its count); only for a method that applies to all of them
    totals = {k: sum(r[k] * r["count"] for r in rows) if all(k in r for r in rows) else None for k in METHODS}
    result = {"environment": harness.environment("cpu"), "preset": args.preset, "pairs": args.pairs,
              "layers": rows, "totals_ms": totals}
    if not args.no_save:
        out = harness.results_dir()
        harness.write_json(out / "per_sample_conv.json", result)
        harness.write_atomic(out / "per_sample_conv.md", markdown(result))
    return 0


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Per-sample conv weight gradients, discriminator `{result['preset']}` at {result['pairs']} pairs "
             f"({env['device']}, {env['threads']} thread(s), torch {env['versions']['torch']}, {env['date']}, "
             f"git {env['git_sha']})", "",
             f"Command: `python bench/{env['command']}`; load average (1 min) {env['load_average_1m']} at the end. "
             "Median process CPU ms per call; `plain` is the non-private weight gradient of the same rows. "
             "Blank: the method does not apply to the layer.", "",
             "| layer (first of its signature) | layers | A | " + " | ".join(METHODS) + " | grouped / plain |",
             "|---|---|---|" + "---|" * len(METHODS) + "---|"]
    for r in result["layers"]:
        cells = [f"{r[k]:.2f}" if k in r else "" for k in METHODS]
        lines.append(f"| {r['layer']} | {r['count']} | {'×'.join(map(str, r['A']))} | " + " | ".join(cells)
                     + f" | {r['grouped'] / r['plain']:.2f} |")
    t = result["totals_ms"]
    lines.append("| **all** | | | " + " | ".join(f"**{t[k]:.1f}**" if t[k] is not None else "" for k in METHODS)
                 + f" | **{t['grouped'] / t['plain']:.2f}** |")
    worst = max((r.get(f"{k}_max_abs_diff", 0.0) for r in result["layers"] for k in METHODS), default=0.0)
    lines += ["", f"Largest difference of any method from `grouped`: {worst:.2e} (float32).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
