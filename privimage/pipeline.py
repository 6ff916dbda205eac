"""The whole PrivImage job (arXiv 2311.12850) in one run directory, stage by stage.

``run_pipeline``: plan the budget → train the query classifier (public data only) → DP semantic query per
sensitive class → public subset relabelled to the sensitive classes → pre-train → DP fine-tune → sample (from
the exported release) → evaluate → export (again: the grid and the final privacy statement). Each stage reads
what the previous one wrote into ``runs/NNNNN-<config>/``:

    config.json            the resolved RunConfig (+ data.name/root/resolution for the evaluator)
    budget.json            PrivacyBudget.state_dict(): plan (query σ; fine-tune σ, q, steps) and ledger
    query/                 classifier.pt, histogram.npy (noisy, per sensitive class), selected_labels.json,
                           subset.npz (the relabelled public pre-training subset)
    checkpoints/           pretrain.pt, finetune.pt (model, EMA, optimizer, sampler, noise RNG, secret key of the
                           diffusion randomness, ledger, log): PRIVATE
    logs/                  pretrain.csv, finetune.csv (step, loss, epsilon, images_per_s, ...): PRIVATE
    samples/               samples.npz (images uint8 (N,C,H,W), labels), grid.png, intermediate grids
    private/               the private evaluation report, cached statistics of real images: PRIVATE
    release/               what may be published (privimage.release): EMA weights (safetensors), public
                           config, privacy statement, the query's DP outputs, samples grid, public report

The query stage (:func:`stage_query`, also what ``privimage query`` runs) is a thin caller of
:mod:`privimage.query.stage` (classifier, votes, this run's release) built on :mod:`privimage.query.semantic`
(the per-class mechanism, its sensitivity, its ledger entry and the privacy contract).

Data roots. ``--sensitive-root``/``--public-root`` are written into the config's data specs
(:meth:`RunConfig.with_roots`) before config.json is saved, so every stage, ``privimage finetune --resume``
and ``privimage evaluate`` read the same files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privimage.config import CONFIGS, RunConfig

__all__ = ["load_run_config", "new_run_dir", "plan_budget", "run_pipeline", "stage_finetune", "stage_pretrain",
           "stage_query", "stage_sample", "stage_evaluate", "write_run_plan"]

# Sizes of well-known training splits, so --dry-run can report σ and steps without reading the files.
KNOWN_SIZES = {("cifar10", "train"): 50_000, ("celeba", "train"): 162_770}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def new_run_dir(root: str | Path, name: str) -> Path:
    """``root/NNNNN-name`` with the next free number (EDM's auto-numbered run directories)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        numbers = [int(p.name[:5]) for p in root.iterdir() if p.name[:5].isdigit()]
        path = root / f"{max(numbers, default=-1) + 1:05d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took the number first
            continue
    raise RuntimeError(f"Could not create a new run directory under {root}.")


# ------------------------------------------------------------------------------------------------------------
# Config and data


def config_json(cfg: RunConfig) -> dict:
    """config.json: the RunConfig, with ``data.name/root/resolution/seed`` added for ``privimage evaluate``."""
    from privimage.data import parse_spec

    d = cfg.to_dict()
    spec = parse_spec(cfg.data.sensitive)
    d["data"].update({"name": spec["name"], "root": spec.get("root"),
                      "resolution": None if cfg.data.pad_to else cfg.data.resolution})
    return d


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory (make one with "
                                f"`privimage run`).")
    d = json.loads(path.read_text())
    for key in ("name", "root"):
        d.get("data", {}).pop(key, None)
    if d.get("data", {}).get("resolution") is None:
        d["data"]["resolution"] = d["data"].get("pad_to") or 32
    return RunConfig.from_dict(d, CONFIGS.get(d.get("name", ""), CONFIGS["demo"]))


def load_split(cfg: RunConfig, which: str, *, root: str | None = None):
    """``which`` in sensitive / sensitive_test / public, at the config's resolution (padded if ``pad_to``)."""
    from privimage.data import ImageDataset, load_spec

    spec = getattr(cfg.data, which)
    if root:
        spec = f"{spec},root={root}"
    extra = {} if cfg.data.pad_to else {"resolution": cfg.data.resolution}
    ds = load_spec(spec, split=which, seed=cfg.data.seed, **extra)
    if cfg.data.pad_to and ds.resolution != cfg.data.pad_to:
        pad = cfg.data.pad_to - ds.resolution
        if pad < 0:
            raise ValueError(f"data.pad_to={cfg.data.pad_to} is smaller than the images ({ds.resolution}).")
        images = F.pad(ds.images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        ds = ImageDataset(images, ds.labels, ds.class_names)
    return ds


def sensitive_size(cfg: RunConfig) -> tuple[int, str]:
    """The number of sensitive images for ``--dry-run``, and where it came from.

    The spec's ``size=``, else the standard size of a well-known split (without reading the files), else
    the loaded data. ``run_pipeline`` itself always plans with the loaded data's size.
    """
    from privimage.data import parse_spec

    spec = parse_spec(cfg.data.sensitive)
    if "size" in spec:
        return int(spec["size"]), "size= in the data spec"
    split = spec.get("split", "sensitive")
    if (spec["name"], split) in KNOWN_SIZES:
        return KNOWN_SIZES[(spec["name"], split)], f"the standard size of {spec['name']}:{split}"
    return len(load_split(cfg, "sensitive")), "the loaded data"


def plan_budget(cfg: RunConfig, num_sensitive: int):
    """The run's PrivacyBudget: the query's σ from its ε share, the fine-tune's σ calibrated on the rest."""
    from privimage.privacy import plan_privimage_budget

    q = cfg.finetune.sample_rate(num_sensitive)
    steps = cfg.finetune.steps(num_sensitive)
    return plan_privimage_budget(epsilon=cfg.epsilon, delta=cfg.delta, sample_rate=q, steps=steps,
                                 query_epsilon_fraction=cfg.query.epsilon_fraction, num_examples=num_sensitive)


def write_run_plan(run_dir: Path, cfg: RunConfig, budget, num_sensitive: int) -> None:
    """``config.json``, ``budget.json`` and, when the budget plans a fine-tune, ``plan.json``: what the stages
    read (``privimage run`` and ``privimage query`` start a run directory with it)."""
    from privimage.privacy import FINETUNE
    from privimage.io import save_json

    save_json(config_json(cfg), run_dir / "config.json")
    save_json(budget.state_dict(), run_dir / "budget.json")
    if FINETUNE in budget.plan:
        save_json(describe_plan(cfg, budget, num_sensitive), run_dir / "plan.json")


def describe_plan(cfg: RunConfig, budget, num_sensitive: int) -> dict:
    from privimage.privacy import FINETUNE, QUERY

    ft = budget.plan[FINETUNE]
    return {"num_sensitive": num_sensitive, "epsilon": cfg.epsilon, "delta": cfg.delta,
            "query_noise_multiplier": budget.plan[QUERY].noise_multiplier,
            "query_epsilon_alone": budget.epsilon_of(QUERY).upper,
            "finetune_noise_multiplier": ft.noise_multiplier, "finetune_sample_rate": ft.sample_rate,
            "finetune_steps": ft.count, "expected_batch_size": ft.sample_rate * num_sensitive,
            "epsilon_planned": budget.epsilon_planned().upper}


# ------------------------------------------------------------------------------------------------------------
# Stages


def stage_query(run_dir: Path, cfg: RunConfig, *, sensitive=None, public_root=None, sensitive_root=None,
                log=_log) -> dict[int, int]:
    """The query stage of ``privimage run`` and ``privimage query``: into ``query/``, the query classifier
    (public data only), the per-class DP query's release, and the public subset relabelled to the sensitive
    classes.

    The steps are :mod:`privimage.query.stage`'s (the privacy contract is :mod:`privimage.query.semantic`'s):
    the classifier, the votes (kept in memory), then this run's release. ``sensitive``: the already loaded
    sensitive split (default: load it). Returns the label map (selected public label -> sensitive class).
    """
    from privimage.query import query_votes
    from privimage.query.stage import query_classifier, release_query, unspent_query_budget

    unspent_query_budget(run_dir)  # before any work: a spent query is refused at once
    sensitive = sensitive if sensitive is not None else load_split(cfg, "sensitive", root=sensitive_root)
    public = load_split(cfg, "public", root=public_root)
    classifier = query_classifier(cfg, public, resolution=sensitive.resolution, log=log)
    classifier.save(run_dir / "query" / "classifier.pt", public_accuracy=classifier.public_accuracy)
    log(f"query: classifier public accuracy {classifier.public_accuracy:.3f}")
    votes = query_votes(classifier, sensitive.images, sensitive.labels, num_classes=sensitive.num_classes,
                        top_k=cfg.query.top_k)
    return release_query(run_dir, cfg, votes, public=public, sensitive_class_names=sensitive.class_names, log=log)


def _load_subset(run_dir: Path):
    path = run_dir / "query" / "subset.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the query stage first (`privimage run`).")
    with np.load(path) as z:
        return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]).long()


def _unet(cfg: RunConfig, run_dir: Path, channels: int | None = None):
    sel = json.loads((run_dir / "query" / "selected_labels.json").read_text())
    num_classes = len(sel["sensitive_class_names"])
    if channels is None:
        images, _ = _load_subset(run_dir)
        channels = images.shape[1]
    return cfg.unet_config(channels=channels, num_classes=num_classes)


def stage_pretrain(run_dir: Path, cfg: RunConfig, *, resume: bool = False, log=_log) -> Path:
    from privimage.train import pretrain, resolve_device

    images, labels = _load_subset(run_dir)
    p = cfg.pretrain
    return pretrain(run_dir, images=images, labels=labels, unet=_unet(cfg, run_dir, images.shape[1]),
                    steps=p.steps, batch_size=p.batch_size, lr=p.lr, ema_decay=p.ema_decay,
                    label_dropout=p.label_dropout, seed=cfg.seed, device=resolve_device(cfg.device),
                    compile=p.compile, checkpoint_every=p.checkpoint_every, log_every=p.log_every,
                    sample_every=p.sample_every, resume=resume, loader=p.loader,
                    ffcv_path=run_dir / "query" / "subset.ffcv", config=cfg.to_dict(), log=log)


def stage_finetune(run_dir: Path, cfg: RunConfig, *, resume: bool = False, sensitive=None, sensitive_root=None,
                   stop_at_step: int | None = None, log=_log) -> Path:
    """DP fine-tune on the sensitive split (``sensitive``: already loaded; default: load it)."""
    from privimage.engine import PrivacyBudget
    from privimage.privacy import FINETUNE
    from privimage.train import finetune, load_checkpoint, resolve_device

    budget = PrivacyBudget.from_state_dict(json.loads((run_dir / "budget.json").read_text()))
    if FINETUNE not in budget.plan:
        raise ValueError(f"{run_dir / 'budget.json'} plans no fine-tune (a standalone `privimage query "
                         f"--epsilon-query` plans the query alone). Plan the whole run: `privimage query --config "
                         f"NAME` without --epsilon-query, or `privimage run`.")
    sensitive = sensitive if sensitive is not None else load_split(cfg, "sensitive", root=sensitive_root)
    pre = run_dir / "checkpoints" / "pretrain.pt"
    init = load_checkpoint(pre)["model"] if cfg.pretrain.steps > 0 and pre.is_file() else None
    if cfg.pretrain.steps > 0 and init is None:
        raise FileNotFoundError(f"{pre} does not exist: run the pretrain stage first.")
    f = cfg.finetune
    return finetune(run_dir, images=sensitive.images, labels=sensitive.labels,
                    unet=_unet(cfg, run_dir, sensitive.images.shape[1]), budget=budget, init_state=init,
                    physical_batch_size=f.physical_batch_size, num_noise=f.num_noise,
                    max_grad_norm=f.max_grad_norm, lr=f.lr, ema_decay=f.ema_decay, label_dropout=f.label_dropout,
                    method=f.method, compile=f.compile, seed=cfg.seed, device=resolve_device(cfg.device), secure_noise=f.secure_noise,
                    checkpoint_every=f.checkpoint_every, log_every=f.log_every, sample_every=f.sample_every,
                    resume=resume, stop_at_step=stop_at_step, config=cfg.to_dict(), log=log)


def stage_sample(run_dir: Path, cfg: RunConfig, *, log=_log) -> Path:
    """samples/samples.npz (balanced labels) and samples/grid.png from the RELEASED model.

    Sampling reads ``release/model.safetensors``, never the private checkpoint; a run directory without a
    release is exported first (:func:`privimage.release.export_release`, which refuses an unfinished fine-tune).
    """
    from privimage.diffusion import sample_in_batches
    from privimage.io import save_npz, save_png_grid
    from privimage.progress import progress_bar
    from privimage.release import RELEASE_DIR, export_release, load_release_denoiser
    from privimage.train import resolve_device

    device = resolve_device(cfg.device)
    if not (run_dir / RELEASE_DIR / "model.safetensors").is_file():
        log(f"no release in {run_dir} yet: exporting it from the finished fine-tune first")
        export_release(run_dir, log=log)
    den = load_release_denoiser(run_dir, device=device)
    c = den.net.config
    s = cfg.sample
    bar = progress_bar(s.num_samples, desc="sampling (released EMA model)", unit="img")
    images, labels = sample_in_batches(den, num=s.num_samples, shape=(c.in_channels, c.resolution, c.resolution),
                                       num_classes=c.num_classes, seed=cfg.seed, batch_size=s.batch_size,
                                       config=s, device=device, progress=bar)
    bar.close()
    out = run_dir / "samples"
    save_npz(out / "samples.npz", images=images.numpy(), labels=labels.numpy())
    # grid: one row per class, the first grid_per_class samples of each
    k = max(c.num_classes, 1)
    rows = [images[labels == cls][:s.grid_per_class] for cls in range(k)] if c.num_classes else [images[:64]]
    save_png_grid(torch.cat(rows), out / "grid.png", nrow=s.grid_per_class if c.num_classes else 8)
    log(f"samples: {len(images)} images -> {out / 'samples.npz'}, grid {out / 'grid.png'}")
    return out / "samples.npz"


def stage_evaluate(run_dir: Path, cfg: RunConfig, *, log=_log) -> dict | None:
    """Issue 8's evaluation with the small classifier preset; None (and a note) if it is unavailable."""
    try:
        from privimage.evaluate import classify
        from privimage.evaluate.report import EvaluateOptions, evaluate_run
    except ImportError as err:
        log(f"evaluation is not available ({err}); samples are in {run_dir / 'samples'}")
        return None
    from privimage.train import resolve_device

    opts = EvaluateOptions(ca=classify.SMALL, device=str(resolve_device(cfg.device)))
    return evaluate_run(run_dir, opts, log=log)


def run_pipeline(cfg: RunConfig, *, out: str | Path = "runs", sensitive_root=None, public_root=None,
                 log=_log) -> Path:
    """The whole job into a new run directory; returns its path.

    The roots go into the config (:meth:`RunConfig.with_roots`); the budget is planned with the loaded
    sensitive split's size, and that split is loaded once for the query and the fine-tune.
    """
    from privimage.io import save_json

    t0 = time.perf_counter()
    cfg = cfg.with_roots(sensitive=sensitive_root, public=public_root)
    sensitive = load_split(cfg, "sensitive")
    n = len(sensitive)
    budget = plan_budget(cfg, n)
    run_dir = new_run_dir(out, cfg.name)
    log(f"run directory: {run_dir}")
    write_run_plan(run_dir, cfg, budget, n)
    from privimage.release import export_release

    times = {}
    for name, fn in (("query", lambda: stage_query(run_dir, cfg, sensitive=sensitive, log=log)),
                     ("pretrain", lambda: stage_pretrain(run_dir, cfg, log=log) if cfg.pretrain.steps else None),
                     ("finetune", lambda: stage_finetune(run_dir, cfg, sensitive=sensitive, log=log)),
                     ("sample", lambda: stage_sample(run_dir, cfg, log=log)),
                     ("evaluate", lambda: stage_evaluate(run_dir, cfg, log=log) if cfg.evaluate else None),
                     ("export", lambda: export_release(run_dir, log=log))):
        t = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t, 2)
        log(f"[{name}] done in {times[name]:.1f} s")
    times["total"] = round(time.perf_counter() - t0, 2)
    save_json(times, run_dir / "logs" / "timings.json")
    log(f"done in {times['total']:.1f} s: {run_dir}")
    return run_dir
