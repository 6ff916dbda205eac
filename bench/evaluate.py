"""Time the evaluation at demo size, and (optionally) cross-check the FID Inception against pytorch-fid.

Timing (default): a run directory with 2,000 32x32 images standing in for samples (embedded data), the real
test split as CA test set, the proxy FID on a query classifier (reference statistics from the sensitive split),
IS, precision/recall, and CA with the ``small`` preset; then the FID Inception's CPU throughput and the
Fréchet distance at D = 2048. Results go to ``bench/results/evaluate.json`` and ``.md``.

    python bench/evaluate.py [--samples 2000] [--threads 2]

Reference check: with pytorch-fid and torchvision unpacked (``pip install --no-deps --target DIR
pytorch-fid==0.3.0 torchvision``; only their Python files are used, torchvision's C++ ops are not loaded),
builds pytorch-fid's FID Inception and ours, loads the same random weights into both and compares pool3
features and logits on the same uint8 images, through each one's own resize and normalisation:

    python bench/evaluate.py --pytorch-fid-check DIR

bf16 against fp32 FID features (the GPU suite): the FID Inception with random He-scaled convolutions and its
BatchNorm statistics taken from one batch of the images (so every layer's output is normalised and the
features differ between images, as a trained network's do), ``--images`` embedded sensitive images against as
many public ones, FID with pool3 features computed in float32 and under bf16 autocast, their difference, and
images/s of each:

    python bench/evaluate.py --features-check --device cuda [--images 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def _provenance(device="cpu") -> dict:
    return harness.environment(device)  # load_average_1m in it: the CPU is shared, timings scale with it


def _proxy_classifier(channels: int, resolution: int, num_classes: int) -> torch.nn.Module:
    try:
        from privimage.query import QueryClassifier
    except ImportError:  # the query package is another engineer's; any module with .features works
        from privimage.evaluate.classify import SmallCNN
        return SmallCNN(channels, num_classes)
    return QueryClassifier(num_classes=num_classes, channels=channels, resolution=resolution)


def time_demo(num_samples: int) -> dict:
    from privimage.data import load_dataset
    from privimage.evaluate import SMALL, EvaluateOptions, evaluate_run
    from privimage.evaluate.fid import frechet_distance
    from privimage.evaluate.inception import FIDInceptionV3, preprocess
    from privimage.io import save_json, save_torch

    out: dict = {"provenance": _provenance(), "num_samples": num_samples}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "00001-bench"
        save_json({"data": {"name": "embedded"}}, run / "config.json")
        fake = load_dataset("embedded", split="sensitive", size=num_samples, seed=1)
        (run / "samples").mkdir(parents=True)
        np.savez(run / "samples" / "samples.npz", images=fake.images.numpy(), labels=fake.labels.numpy())
        model = _proxy_classifier(fake.images.shape[1], fake.resolution, 100)
        if hasattr(model, "save"):
            model.save(run / "query" / "classifier.pt")
        else:
            save_torch(model, run / "query" / "classifier.pt")
        opts = EvaluateOptions(ca=SMALL, cache_dir=str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        report = evaluate_run(run, opts, log=lambda m: None)
        out["first_run_s"] = time.perf_counter() - t0
        out["timings_first"] = report["timings"]
        t0 = time.perf_counter()
        report = evaluate_run(run, EvaluateOptions(ca_protocol="none", cache_dir=str(Path(tmp) / "cache")),
                              log=lambda m: None)
        out["cached_reference_fidelity_s"] = report["timings"]["fidelity_s"]
        # FID against the sensitive training split is in the private report (privimage.evaluate.report)
        from privimage.evaluate.report import PRIVATE_REPORT

        metrics = {**report["metrics"], **json.loads((run / PRIVATE_REPORT).read_text())["metrics"]}
        out["metrics"] = {k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, str))}
                          for k, v in metrics.items()}
        out["num_reference"] = metrics["proxy_fid"]["num_reference"]

    net = FIDInceptionV3().eval()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        net(preprocess(x[:2]))  # warm-up
        t0 = time.perf_counter()
        net(preprocess(x))
    per_image = (time.perf_counter() - t0) / 16
    out["inception_cpu_images_per_s"] = 1 / per_image
    out["inception_cpu_5k_images_estimate_s"] = 5000 * per_image

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3000, 2048))
    s1, s2 = np.cov(a[:1500], rowvar=False), np.cov(a[1500:], rowvar=False)
    t0 = time.perf_counter()
    frechet_distance(a[:1500].mean(0), s1, a[1500:].mean(0), s2)
    out["frechet_distance_2048_s"] = time.perf_counter() - t0
    return out


def random_inception_weights(state_dict: dict, gen: torch.Generator) -> dict:
    """Random weights for the FID Inception's keys, with non-trivial BatchNorm statistics (He-scaled
    convolutions, running variances in [0.5, 1.5]), so features are neither zero nor saturated."""
    weights = {}
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked"):
            weights[k] = v
        elif k.endswith("running_var"):
            weights[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith("conv.weight"):
            weights[k] = torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5
        else:
            weights[k] = torch.randn(v.shape, generator=gen) * 0.1
    return weights


def features_check(num_images: int, device: str, batch: int = 250) -> dict:
    """FID of embedded sensitive vs public images with float32 and with bf16-autocast features (random-weight
    Inception), their difference and each one's images/s (module docstring)."""
    from privimage.data import load_dataset
    from privimage.evaluate.fid import FeatureStats, fid_from_stats
    from privimage.evaluate.inception import FIDInceptionV3, preprocess

    net = FIDInceptionV3()
    net.load_state_dict(random_inception_weights(net.state_dict(), torch.Generator().manual_seed(0)))
    net = net.to(device)
    sets = [load_dataset("embedded", split=split, size=num_images, seed=1).images
            for split in ("sensitive", "public")]
    for m in net.modules():  # BatchNorm: unit affine, statistics of one batch of both sets (cumulative)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
            m.momentum = None
    with torch.no_grad():
        net.train()(preprocess(torch.cat([s[:batch // 2] for s in sets]).to(device)))
    net.eval()
    out: dict = {"provenance": _provenance(device), "images_per_set": num_images,
                 "weights": "random convolutions, BatchNorm statistics of one batch of the images"}
    feats = {}
    for dtype in ("float32", "bfloat16"):
        amp = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bfloat16"
               else contextlib.nullcontext())
        with torch.no_grad(), amp:
            net(preprocess(sets[0][:2].to(device)))  # warm-up
            harness.sync(device)
            t0 = time.perf_counter()
            feats[dtype] = [torch.cat([net(preprocess(images[i:i + batch].to(device)))[0].float().cpu()
                                       for i in range(0, len(images), batch)]) for images in sets]
            harness.sync(device)
        seconds = time.perf_counter() - t0
        stats = [FeatureStats.from_features(f.double().numpy()) for f in feats[dtype]]
        out[dtype] = {"fid": fid_from_stats(*stats), "images_per_s": 2 * num_images / seconds}
    fp32, bf16 = out["float32"]["fid"], out["bfloat16"]["fid"]
    out["fid_abs_diff"] = abs(bf16 - fp32)
    out["fid_rel_diff"] = abs(bf16 - fp32) / max(abs(fp32), 1e-12)
    f32, f16 = torch.cat(feats["float32"]), torch.cat(feats["bfloat16"])
    out["feature_rel_err"] = float((f16 - f32).norm() / f32.norm().clamp_min(1e-30))
    return out


def pytorch_fid_check(pkg_dir: str) -> dict:
    """Compare against pytorch-fid's FID Inception (see the module docstring); returns max relative diffs."""
    root = Path(pkg_dir) / "torchvision"
    # Load torchvision's inception.py without torchvision/__init__ (its C++ ops need a matching torch build).
    tv = types.ModuleType("torchvision")
    import re

    # pytorch-fid branches on torchvision's version; read it without importing torchvision/version.py
    version = re.search(r"__version__ = '([^']+)'", (root / "version.py").read_text()).group(1)
    tv.__path__, tv.__version__ = [str(root)], version
    models = types.ModuleType("torchvision.models")
    models.__path__ = [str(root / "models")]
    sys.modules.update({"torchvision": tv, "torchvision.models": models})
    tv.models = models
    sys.path.insert(0, pkg_dir)
    models.inception = importlib.import_module("torchvision.models.inception")
    models.inception_v3 = models.inception.inception_v3
    from pytorch_fid import inception as pfi

    from privimage.evaluate.inception import FIDInceptionV3, preprocess

    ref = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pfi.FIDInceptionE_1(1280)), ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
        setattr(ref, name, block)  # what pytorch-fid's fid_inception_v3() does before loading the weights
    ours = FIDInceptionV3()
    ref_sd = ref.state_dict()
    gen = torch.Generator().manual_seed(0)
    weights = random_inception_weights(ref_sd, gen)
    ref.load_state_dict(weights)
    ours.load_state_dict(weights)
    ref.eval()
    ours.eval()
    # pytorch-fid's InceptionV3 wrapper (resize to 299 + 2x-1, then the blocks up to the final average pool)
    wrapper = pfi.InceptionV3.__new__(pfi.InceptionV3)
    torch.nn.Module.__init__(wrapper)
    wrapper.resize_input, wrapper.normalize_input = True, True
    wrapper.output_blocks, wrapper.last_needed_block = [3], 3
    wrapper.blocks = torch.nn.ModuleList([
        torch.nn.Sequential(ref.Conv2d_1a_3x3, ref.Conv2d_2a_3x3, ref.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2)),
        torch.nn.Sequential(ref.Conv2d_3b_1x1, ref.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2)),
        torch.nn.Sequential(ref.Mixed_5b, ref.Mixed_5c, ref.Mixed_5d, ref.Mixed_6a, ref.Mixed_6b, ref.Mixed_6c,
                            ref.Mixed_6d, ref.Mixed_6e),
        torch.nn.Sequential(ref.Mixed_7a, ref.Mixed_7b, ref.Mixed_7c, torch.nn.AdaptiveAvgPool2d((1, 1)))])
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        ref_pool = wrapper(images.float() / 255)[0].flatten(1)
        ref_logits = ref.fc(ref_pool)
        our_pool, our_logits = ours(preprocess(images))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return {"provenance": _provenance(), "reference": f"pytorch-fid (FIDInceptionA/C/E_1/E_2 on torchvision "
            f"{tv.__version__} Inception3), random weights", "same_keys": set(ref_sd) == set(ours.state_dict()),
            "num_keys": len(ref_sd), "pool3_max_rel_diff": rel(our_pool, ref_pool),
            "logits_max_rel_diff": rel(our_logits, ref_logits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--pytorch-fid-check", metavar="DIR", default=None)
    parser.add_argument("--features-check", action="store_true", help="bf16 vs fp32 FID features")
    parser.add_argument("--images", type=int, default=2000, help="--features-check: images per set")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = harness.results_dir()
    if args.pytorch_fid_check:
        result = pytorch_fid_check(args.pytorch_fid_check)
        harness.write_json(results / "evaluate_pytorch_fid_check.json", result)
    elif args.features_check:
        result = features_check(args.images, args.device)
        harness.write_json(results / "evaluate_features.json", result)
    else:
        result = time_demo(args.samples)
        harness.write_json(results / "evaluate.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
