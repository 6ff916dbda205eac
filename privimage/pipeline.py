"""The whole PrivImage job (arXiv 2311.12850) in one run directory, stage by stage.

``run_pipeline``: check everything (:func:`privimage.preflight.preflight`: config, device, data files,
privacy settings, output folder) → plan the budget → make and lock the run directory → train the query
classifier (public data only) → DP semantic query per sensitive class → public subset relabelled to the
sensitive classes → pre-train → DP fine-tune → sample (from the exported release) → evaluate → export (again:
the grid and the final privacy statement). The config's ``kind`` picks the generator of the three training
stages: the UNet (PRIVIMAGE+D) or the GAN (PRIVIMAGE+G, :mod:`privimage.train.gan_pretrain`,
:mod:`privimage.train.gan_finetune`); the query, the budget plan (the GAN's DP steps are its discriminator
steps), the release, samples.npz and the evaluation are the same for both. Each stage reads what the previous one wrote into
``runs/NNNNN-<config>/``, whose layout :class:`privimage.rundir.RunDir` owns.

``resume_pipeline`` continues a run directory whose ``privimage run`` stopped (a crash, a full disk, Ctrl-C):
a stage that finished is skipped, a stage with a checkpoint resumes from it (exactly: same ledger, same
weights as an uninterrupted run), the rest run. A query whose spend is recorded is never made again: if its
selection was written, only the subset is rebuilt from it (post-processing, no privacy cost); if not, the run
directory cannot continue and the error says so.

The query stage (:func:`stage_query`, also what ``privimage query`` runs) is a thin caller of
:mod:`privimage.query.stage` (classifier, votes, this run's release) built on :mod:`privimage.query.semantic`
(the per-class mechanism, its sensitivity, its ledger entry and the privacy contract).

Data roots. ``--sensitive-root``/``--public-root`` are written into the config's data specs
(:meth:`RunConfig.with_roots`) before config.json is saved, so every stage, ``privimage finetune --resume``
and ``privimage evaluate`` read the same files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from privimage.config import RunConfig
from privimage.errors import ConfigError, DataError, RunDirError
from privimage.preflight import describe_plan, plan_budget, preflight
from privimage.rundir import RunDir, config_json

__all__ = ["config_json", "continue_run", "load_run_config", "load_split", "plan_budget", "pretrain_finished",
           "query_spent", "resume_pipeline", "run_pipeline", "stage_evaluate", "stage_finetune", "stage_pretrain",
           "stage_query", "stage_query_release", "stage_sample", "write_run_plan", "write_subset"]


#: The stages every rank works on under torchrun (privimage.distributed); rank 0 alone runs the others.
SHARED_STAGES = ("query", "pretrain", "finetune", "sample")


def _log(msg: str) -> None:
    from privimage.distributed import is_writer

    if is_writer():  # under torchrun, rank 0 alone reports
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Config and data


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The checked RunConfig of an existing run directory (:meth:`RunDir.load_config`)."""
    return RunDir.open(run_dir).load_config()


def load_split(cfg: RunConfig, which: str, *, root: str | None = None):
    """``which`` in sensitive / sensitive_test / public, at the config's resolution (padded if ``pad_to``)."""
    from privimage.data import ImageDataset, load_spec

    spec = getattr(cfg.data, which)
    if root:
        spec = f"{spec},root={root}"
    extra = {} if cfg.data.pad_to else {"resolution": cfg.data.resolution}
    try:
        ds = load_spec(spec, split=which, seed=cfg.data.seed, **extra)
    except DataError as err:
        raise DataError(f"data.{which}: {err}") from None
    if cfg.data.pad_to and ds.resolution != cfg.data.pad_to:
        pad = cfg.data.pad_to - ds.resolution
        if pad < 0:
            raise ConfigError(f"data.pad_to={cfg.data.pad_to} is smaller than the images ({ds.resolution}).")
        images = F.pad(ds.images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        ds = ImageDataset(images, ds.labels, ds.class_names)
    if len(ds) == 0:
        raise DataError(f"data.{which} {spec!r} holds no images.")
    return ds


def write_run_plan(run: RunDir | Path, cfg: RunConfig, budget, num_sensitive: int) -> None:
    """``config.json``, ``budget.json`` and, when the budget plans a fine-tune, ``plan.json``: what the stages
    read (``privimage query`` starts a run directory with it; ``privimage run`` through :meth:`RunDir.create`)."""
    from privimage.privacy import FINETUNE

    run = RunDir.of(run)
    run.save_config(cfg)
    run.save_budget(budget)
    if FINETUNE in budget.plan:
        run.save_plan(describe_plan(cfg, budget, num_sensitive))


# ------------------------------------------------------------------------------------------------------------
# Stages


def stage_query(run_dir: RunDir | Path, cfg: RunConfig, *, sensitive=None, public_root=None, sensitive_root=None,
                log=_log) -> dict[int, int]:
    """The query stage of ``privimage run`` and ``privimage query``: into ``query/``, the query classifier
    (public data only), the per-class DP query's release, and the public subset relabelled to the sensitive
    classes.

    The steps are :mod:`privimage.query.stage`'s (the privacy contract is :mod:`privimage.query.semantic`'s):
    the classifier, the votes (kept in memory), then this run's release. ``sensitive``: the already loaded
    sensitive split (default: load it). Returns the label map (selected public label -> sensitive class).
    """
    from privimage import distributed
    from privimage.query.stage import query_classifier, shared_votes, unspent_query_budget

    unspent_query_budget(run_dir)  # before any work: a spent query is refused at once
    sensitive = sensitive if sensitive is not None else load_split(cfg, "sensitive", root=sensitive_root)
    public = load_split(cfg, "public", root=public_root)
    classifier = None
    if distributed.is_writer():  # under torchrun: rank 0 trains it (public data only) and hands it over
        classifier = query_classifier(cfg, public, resolution=sensitive.resolution, log=log)
        log(f"query: classifier public accuracy {classifier.public_accuracy:.3f}")
    classifier = distributed.share(classifier)
    votes = shared_votes(classifier, sensitive.images, sensitive.labels, num_classes=sensitive.num_classes,
                         top_k=cfg.query.top_k)
    label_map = None
    if distributed.is_writer():  # the noise is drawn once, on rank 0; the selection goes to every rank
        label_map = stage_query_release(run_dir, cfg, classifier=classifier, votes=votes, public=public,
                                        sensitive_class_names=sensitive.class_names, log=log)
    return distributed.share(label_map)


def stage_query_release(run_dir: RunDir | Path, cfg: RunConfig, *, classifier, votes, public,
                        sensitive_class_names: list[str], log=_log) -> dict[int, int]:
    """The query stage's writes from a classifier and votes already computed (``privimage sweep`` computes them
    once for many run directories): ``query/classifier.pt``, then this run's own release of the votes
    (:func:`privimage.query.stage.release_query`: its σ, its ledger). Returns the label map."""
    from privimage.query.stage import release_query

    classifier.save(RunDir.of(run_dir).classifier_path, public_accuracy=classifier.public_accuracy)
    return release_query(run_dir, cfg, votes, public=public, sensitive_class_names=sensitive_class_names, log=log)


def write_subset(run: RunDir, cfg: RunConfig, public, label_map: dict[int, int], num_classes: int) -> int:
    """query/subset.npz from a recorded selection (``label_map``: public label -> sensitive class), as the query
    stage writes it. Post-processing of the query's DP output: no privacy cost. Returns the subset's size."""
    from privimage.query.subset import relabelled_subset

    subset = relabelled_subset(label_map, public, num_classes=num_classes, max_per_label=cfg.query.max_per_label,
                               seed=cfg.seed)
    run.save_subset(subset.images.numpy(), subset.labels.numpy())
    return len(subset)


def _model_config(cfg: RunConfig, run: RunDir, channels: int):
    """The run's model for its data: a UNetConfig, or a GANConfig with ``kind = "gan"``."""
    num_classes = len(run.load_selection()["sensitive_class_names"])
    make = cfg.gan_config if cfg.kind == "gan" else cfg.unet_config
    return make(channels=channels, num_classes=num_classes)


def stage_pretrain(run_dir: RunDir | Path, cfg: RunConfig, *, resume: bool = False, log=_log) -> Path:
    """Non-private pre-training on query/subset.npz: the UNet, or the GAN (``kind = "gan"``)."""
    from privimage.train import pretrain, pretrain_gan, resolve_device

    run = RunDir.of(run_dir)
    images, labels = run.load_subset()
    model = _model_config(cfg, run, images.shape[1])
    common = dict(images=images, labels=labels, seed=cfg.seed, device=resolve_device(cfg.device), resume=resume,
                  run_config=cfg.to_dict(), log=log)
    if cfg.kind == "gan":
        return pretrain_gan(run, cfg.pretrain, gan=model, **common)
    return pretrain(run, cfg.pretrain, unet=model, **common)


def stage_finetune(run_dir: RunDir | Path, cfg: RunConfig, *, resume: bool = False, sensitive=None,
                   sensitive_root=None, stop_at_step: int | None = None, log=_log) -> Path:
    """DP fine-tune on the sensitive split (``sensitive``: already loaded; default: load it): the UNet, or with
    ``kind = "gan"`` the discriminator by DP-SGD and the generator from it (one budget step per discriminator
    step)."""
    from privimage.privacy import FINETUNE
    from privimage.train import finetune, finetune_gan, pretrained_init, resolve_device

    run = RunDir.of(run_dir)
    budget = run.load_budget()
    if FINETUNE not in budget.plan:
        raise RunDirError(f"{run.budget_path} plans no fine-tune (a standalone `privimage query --epsilon-query` "
                          f"plans the query alone). Plan the whole run: `privimage query --config NAME` without "
                          f"--epsilon-query, or `privimage run`.")
    sensitive = sensitive if sensitive is not None else load_split(cfg, "sensitive", root=sensitive_root)
    gan = cfg.kind == "gan"
    init = None
    if cfg.pretrain.steps > 0:  # the pre-trained start (before anything else: its absence is the first error)
        init = pretrained_init(run) if gan else run.load_checkpoint("pretrain")["model"]
    model = _model_config(cfg, run, sensitive.images.shape[1])
    common = dict(images=sensitive.images, labels=sensitive.labels, budget=budget, init_state=init, seed=cfg.seed,
                  device=resolve_device(cfg.device), resume=resume, stop_at_step=stop_at_step,
                  run_config=cfg.to_dict(), log=log)
    if gan:
        return finetune_gan(run, cfg.finetune, gan=model, **common)
    return finetune(run, cfg.finetune, unet=model, **common)


def stage_sample(run_dir: RunDir | Path, cfg: RunConfig, *, log=_log) -> Path:
    """samples/samples.npz (balanced labels) and samples/grid.png from the RELEASED model.

    Sampling reads ``release/model.safetensors``, never the private checkpoint; a run directory without a
    release is exported first (:func:`privimage.release.export_release`, which refuses an unfinished fine-tune).
    Image i comes from seed (cfg.seed, i): the diffusion sampler's ``sample.num_steps`` steps, or one generator
    forward (``kind = "gan"``).
    """
    from privimage.diffusion import sample_in_batches
    from privimage.gan import sample_gan_in_batches
    from privimage.io import save_png_grid
    from privimage.progress import progress_bar
    from privimage.release import export_release, load_release_denoiser, load_release_generator
    from privimage.train import resolve_device

    from privimage import distributed

    run = RunDir.of(run_dir)
    launch = distributed.current()
    device = launch.device if launch is not None and launch.device is not None else resolve_device(cfg.device)
    if distributed.is_writer() and not run.release_model_path.is_file():  # none yet: export the fine-tune first
        export_release(run, log=log)
    distributed.barrier()
    s = cfg.sample
    parts = distributed.my_batches(s.num_samples, s.batch_size)  # under torchrun, this rank's batches
    bar = progress_bar(s.num_samples, desc="sampling (released EMA model)", unit="img",
                       enabled=distributed.is_writer())
    if cfg.kind == "gan":
        generator = load_release_generator(run, device=device)
        num_classes = generator.config.num_classes
        images, labels = sample_gan_in_batches(generator, num=s.num_samples, seed=cfg.seed, batch_size=s.batch_size,
                                               device=device, progress=bar, batches=parts)
    else:
        den = load_release_denoiser(run, device=device)
        c = den.net.config
        num_classes = c.num_classes
        images, labels = sample_in_batches(den, num=s.num_samples, shape=(c.in_channels, c.resolution, c.resolution),
                                           num_classes=c.num_classes, seed=cfg.seed, batch_size=s.batch_size,
                                           config=s, device=device, progress=bar, batches=parts)
    bar.close()
    images = distributed.gather_batches(images, parts, s.num_samples)
    labels = distributed.gather_batches(labels, parts, s.num_samples)
    if not distributed.is_writer():  # rank 0 writes
        return run.samples_path
    run.save_samples(images.numpy(), labels.numpy())
    # grid: one row per class, the first grid_per_class samples of each
    k = max(num_classes, 1)
    rows = [images[labels == cls][:s.grid_per_class] for cls in range(k)] if num_classes else [images[:64]]
    save_png_grid(torch.cat(rows), run.grid_path, nrow=s.grid_per_class if num_classes else 8)
    log(f"samples: {len(images)} images -> {run.samples_path}, grid {run.grid_path}")
    return run.samples_path


def stage_evaluate(run_dir: RunDir | Path, cfg: RunConfig, *, log=_log) -> dict | None:
    """Issue 8's evaluation with the small classifier preset; None (and a note) if it is unavailable."""
    run = RunDir.of(run_dir)
    try:
        from privimage.evaluate import classify
        from privimage.evaluate.report import EvaluateOptions, evaluate_run
    except ImportError as err:
        log(f"evaluation is not available ({err}); samples are in {run.samples_dir}")
        return None
    from privimage.train import resolve_device

    opts = EvaluateOptions(ca=classify.SMALL, device=str(resolve_device(cfg.device)))
    return evaluate_run(run.path, opts, log=log)


# ------------------------------------------------------------------------------------------------------------
# The whole job, and its resumption


def run_pipeline(cfg: RunConfig, *, out: str | Path = "runs", sensitive_root=None, public_root=None,
                 log=_log) -> Path:
    """The whole job into a new run directory; returns its path.

    Everything is checked first (:func:`privimage.preflight.preflight`); the budget is planned with the loaded
    sensitive split's size, and that split is loaded once for the query and the fine-tune. Nothing is written
    before those checks pass, and the run directory is locked while the job runs.
    """
    t0 = time.perf_counter()
    cfg = cfg.with_roots(sensitive=sensitive_root, public=public_root)
    preflight(cfg, plan=False, out=out)
    sensitive = load_split(cfg, "sensitive")
    n = len(sensitive)
    budget = plan_budget(cfg, n)
    with RunDir.create(out, cfg.name, command="run", config=cfg, budget=budget, plan=describe_plan(cfg, budget, n),
                       log=log) as run:
        log(f"run directory: {run.path}")
        _stages(run, cfg, sensitive, resume=False, t0=t0, log=log)
    return run.path


def resume_pipeline(run_dir: str | Path, *, log=_log) -> Path:
    """Finish a run directory whose ``privimage run`` stopped (module docstring); returns its path."""
    t0 = time.perf_counter()
    run = RunDir.open(run_dir)
    with run.lock("run --resume", log=log):
        cfg = run.load_config()
        preflight(cfg, plan=False)
        run.load_budget()  # readable before anything else happens
        sensitive = load_split(cfg, "sensitive")
        log(f"resuming {run.path}")
        _stages(run, cfg, sensitive, resume=True, t0=t0, log=log)
    return run.path


def _stages(run: RunDir, cfg: RunConfig, sensitive, *, resume: bool, t0: float, log) -> None:
    from privimage.release import export_release

    def query():
        if resume and query_spent(run, cfg, log):
            return None
        return stage_query(run, cfg, sensitive=sensitive, log=log)

    def pretrain():
        if cfg.pretrain.steps and not (resume and pretrain_finished(run)):
            stage_pretrain(run, cfg, resume=resume and run.checkpoint_path("pretrain").is_file(), log=log)

    def finetune():
        stage_finetune(run, cfg, sensitive=sensitive, resume=resume and run.checkpoint_path("finetune").is_file(),
                       log=log)

    from privimage import distributed

    times = {}
    for name, fn in (("query", query), ("pretrain", pretrain), ("finetune", finetune),
                     ("sample", lambda: stage_sample(run, cfg, log=log)),
                     ("evaluate", lambda: stage_evaluate(run, cfg, log=log) if cfg.evaluate else None),
                     ("export", lambda: export_release(run, log=log))):
        t = time.perf_counter()
        if name in SHARED_STAGES or distributed.is_writer():  # under torchrun, rank 0 alone runs the others
            fn()
        distributed.barrier()
        times[name] = round(time.perf_counter() - t, 2)
        log(f"[{name}] done in {times[name]:.1f} s")
    times["total"] = round(time.perf_counter() - t0, 2)
    if not distributed.is_writer():
        return
    run.save_timings({**times, **distributed.launch_info()})
    log(f"done in {times['total']:.1f} s: {run.path}")


def continue_run(run: RunDir, cfg: RunConfig, sensitive, *, log=_log) -> None:
    """The stages of ``run`` still to do, as ``resume_pipeline`` runs them (finished ones skipped, started ones
    resumed), for a caller that holds the run's lock and has loaded ``sensitive`` (``privimage sweep``, after
    its own query stage and a shared pre-training)."""
    _stages(run, cfg, sensitive, resume=True, t0=time.perf_counter(), log=log)


def pretrain_finished(run: RunDir) -> bool:
    """True when ``checkpoints/pretrain.pt`` is at its last step and the stage's last write (the final grid,
    ``samples/pretrain.png``) exists: nothing of the pre-training is left to do."""
    if not (run.checkpoint_path("pretrain").is_file() and run.training_grid_path("pretrain").is_file()):
        return False
    state = run.load_checkpoint("pretrain", model_kind=None)  # diffusion or GAN: the step counts alike
    return state["step"] >= state["steps"]


def query_spent(run: RunDir, cfg: RunConfig, log) -> bool:
    """On resume: True when the query's spend is recorded and its outputs are complete (rebuilding the
    subset from the selection if it is missing); False when the query was never spent (run it)."""
    from privimage.privacy import QUERY

    if run.load_budget().spent.get(QUERY, 0) == 0:
        return False
    if not (run.selection_path.is_file() and run.histogram_path.is_file()):
        raise RunDirError(f"{run.budget_path} records the query as spent, but its outputs ({run.selection_path.name}, "
                          f"{run.histogram_path.name}) were never written; the query cannot be made again in this run "
                          f"directory without spending twice. Start a new run directory.")
    if not run.subset_path.is_file():
        selection = run.load_selection()
        label_map = {int(j): int(c) for j, c in selection["label_map"].items()}
        size = write_subset(run, cfg, load_split(cfg, "public"), label_map,
                            len(selection["sensitive_class_names"]))
        log(f"query: already spent; rebuilt {run.subset_path} ({size} public images) from its selection")
    return True
