"""ε sweeps: many (ε, seed) points of one config, sharing everything public and nothing private.

``privimage sweep --config NAME --epsilons 1,5,10,inf --seeds 0,1,2`` makes ``runs/NNNNN-sweep-NAME/`` holding
one complete run directory per point (:mod:`privimage.sweep.plan` for the layout), each what ``privimage run
--config NAME --epsilon E --seed S`` would make alone: the same stages (:mod:`privimage.pipeline`), the same
:class:`~privimage.rundir.RunDir`, the same ledger. In order:

1. **plan** every point's budget (σ calibrated per ε, before anything is written: an impossible ε stops the
   sweep with nothing made);
2. **query**, in this process: the query classifier (public data only) is trained once per seed (and cached
   on disk as ever); the sensitive images' votes are counted once per seed and held in memory only, never
   written; each point then makes its OWN Gaussian release of them with the σ of its own ``budget.json``, its
   spend written there before its noise is drawn (:func:`privimage.pipeline.stage_query_release`);
3. **pre-train** once per distinct (selected subset's content, pre-training config, UNet, seed): points
   whose queries selected the same subset share one pre-trained model, computed in one of them and
   hard-linked (or copied) read-only into the others' ``checkpoints/pretrain.pt`` (with its log and grids),
   so every point directory is complete on its own; pre-training reads public images only;
4. **finish** each point (DP fine-tune, sampling, evaluation, export) as a queue over the devices
   (:mod:`privimage.sweep.queue`: one worker per device);
5. **summarise**: ``sweep.json``, ``sweep.md`` and ``sweep.png`` (:mod:`privimage.sweep.summary`, with the
   privacy of publishing several points: their composition).

``inf`` is the non-private reference: σ = 0 for the query and the fine-tune (``RunConfig.non_private``),
labelled NOT PRIVATE in its directory, its release and the summary, and left out of every composition.

``--resume SWEEP_DIR`` finishes what is missing: a point whose query was spent is never queried again (its
subset is rebuilt from its selection if needed), a finished pre-training is reused, a started fine-tune
resumes from its checkpoint with its ledger (:func:`privimage.pipeline.continue_run`), a finished point is
left alone.

``--shard i/n`` runs only the points ``j`` with ``j % n == i`` of the sweep's list (ε-major, then seed:
:class:`~privimage.sweep.plan.Shard`), in a sweep directory of their own: ``n`` independent jobs (a cluster job
array) cover the sweep, each point exactly once and each complete on its own, the same point directory the
unsharded sweep makes. Sharing happens within a shard only (the votes, a pre-training), so a shard recomputes
what another shard's points could have shared. The shard is saved in ``sweep.json`` and ``--resume`` keeps it.
The privacy composition a shard's summary prints covers its own points; publishing points of several shards
spends the composition of all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from privimage.config import RunConfig
from privimage.errors import ConfigError, RunDirError
from privimage.rundir import RunDir
from privimage.sweep.plan import (FORMAT, Point, Shard, SweepDir, parse_epsilons, parse_seeds, parse_shard, point_config,
                                  resolve_devices)
from privimage.sweep.queue import Job, SweepProgress, run_queue

__all__ = ["Point", "Shard", "SweepDir", "dry_run", "parse_epsilons", "parse_seeds", "parse_shard", "pretrain_key",
           "resolve_devices", "resume_sweep", "run_job", "run_sweep"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _points(epsilons, seeds, shard: Shard | None = None) -> list[Point]:
    """The sweep's points, ε-major then seed (the order ``--shard`` counts in); only ``shard``'s if given."""
    points = [Point(float(e), int(s)) for e in epsilons for s in seeds]
    return points if shard is None else shard.select(points)


def _plan(cfg: RunConfig, points: list[Point], num_sensitive: int) -> dict:
    """Every point's budget (name -> PrivacyBudget), calibrated before anything is written."""
    from privimage.preflight import plan_budget

    return {p.name: plan_budget(point_config(cfg, p), num_sensitive) for p in points}


def dry_run(cfg: RunConfig, *, epsilons, seeds, shard: Shard | None = None, devices: str = "auto", out="runs") -> dict:
    """What a sweep would do: the points with their σ and steps, the devices, the planned composition."""
    from privimage.preflight import describe_plan, preflight
    from privimage.sweep.summary import compose_points

    points = _points(epsilons, seeds, shard)
    devs = resolve_devices(devices)
    found = preflight(cfg, out=out)
    budgets = _plan(cfg, points, found.num_sensitive)
    return {"config": cfg.name, "devices": devs, "num_sensitive": found.num_sensitive,
            "shard": None if shard is None else {**shard.to_json(), "points": [p.name for p in points]},
            "points": [{**p.to_json(), "name": p.name, **describe_plan(point_config(cfg, p), budgets[p.name],
                                                                         found.num_sensitive)} for p in points],
            "privacy_if_all_published": compose_points(SweepDir(out), points, delta=cfg.delta, planned=budgets),
            "checked": found.checked()}


def run_sweep(cfg: RunConfig, *, epsilons, seeds, shard: Shard | None = None, devices: str = "auto", out="runs",
              log=_log) -> Path:
    """A new sweep directory under ``out`` with every point (of ``shard``, if given) finished (module
    docstring); returns its path."""
    from privimage.pipeline import load_split
    from privimage.preflight import preflight

    everything = _points(epsilons, seeds)
    points = _points(epsilons, seeds, shard)  # a shard with no point is refused first
    devs = resolve_devices(devices)
    preflight(cfg, plan=False, out=out)
    sensitive = load_split(cfg, "sensitive")
    _plan(cfg, points, len(sensitive))  # an impossible epsilon stops here, before anything is written
    sweep = SweepDir.make(out, cfg.name, shard)
    log(f"sweep directory: {sweep.path}")
    if shard is not None:
        log(f"sweep: shard {shard} holds {len(points)} of the {len(everything)} points: {', '.join(p.name for p in points)}")
    with sweep.lock("sweep", log=log):
        state = {"format": FORMAT, "config_name": cfg.name, "config": cfg.to_dict(),
                 "epsilons": [p.to_json()["epsilon"] for p in everything[::len(seeds)]], "seeds": list(seeds),
                 "shard": None if shard is None else shard.to_json(),
                 "devices": devs, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        sweep.save(state)
        _execute(sweep, cfg, state, points, devs, sensitive, log)
    return sweep.path


def resume_sweep(path, *, config: RunConfig | None = None, epsilons=None, seeds=None, shard: Shard | None = None,
                 devices: str = "auto", log=_log) -> Path:
    """Finish the sweep directory ``path``: only what is missing, never a point's spend twice."""
    from privimage.pipeline import load_split
    from privimage.preflight import preflight

    sweep = SweepDir.open(path)
    devs = resolve_devices(devices)
    with sweep.lock("sweep --resume", log=log):
        state = sweep.load()
        cfg = sweep.load_config()
        if config is not None and config.to_dict() != cfg.to_dict():
            differ = sorted(k for k, v in config.to_dict().items() if cfg.to_dict().get(k) != v)
            raise RunDirError(f"--resume {sweep.path}: that sweep was made with config {state['config_name']!r}, "
                              f"not this --config {config.name!r} (they differ in {', '.join(differ)}); drop --config "
                              f"to continue it as it was, or start a new sweep.")
        saved_eps = tuple(float(e) for e in state["epsilons"])
        for flag, given, saved in (("--epsilons", epsilons, saved_eps), ("--seeds", seeds, tuple(state["seeds"]))):
            if given is not None and tuple(given) != saved:
                raise ConfigError(f"--resume {sweep.path}: {flag} {','.join(map(str, given))} differs from the sweep's "
                                  f"{','.join(map(str, saved))}; drop {flag} (a sweep continues as it was planned).")
        saved_shard = Shard.from_json(state.get("shard"))
        if shard is not None and shard != saved_shard:
            raise ConfigError(f"--resume {sweep.path}: --shard {shard} differs from the sweep's "
                              + (f"shard {saved_shard}" if saved_shard else "(it is not sharded: all its points)")
                              + "; drop --shard (a sweep continues with its own shard).")
        preflight(cfg, plan=False)
        sensitive = load_split(cfg, "sensitive")
        log(f"resuming sweep {sweep.path}" + (f" (shard {saved_shard})" if saved_shard else ""))
        state["devices"] = devs
        _execute(sweep, cfg, state, _points(saved_eps, state["seeds"], saved_shard), devs, sensitive, log)
    return sweep.path


# ------------------------------------------------------------------------------------------------------------
# The phases


def _execute(sweep: SweepDir, cfg: RunConfig, state: dict, points: list[Point], devices: list[str], sensitive,
             log) -> None:
    t0 = time.perf_counter()
    _SENSITIVE[_data_key(cfg)] = sensitive  # this process's workers reuse the loaded split
    for p in points:
        _make_point(sweep.run(p), point_config(cfg, p), len(sensitive))
    _queries(sweep, cfg, points, sensitive, log)
    groups = _pretrain_groups(sweep, cfg, points)
    state["pretraining"] = [{"key": key, "computed_in": owner.name, "shared_with": [p.name for p in members]}
                            for key, (owner, members) in groups.items()]
    for group in state["pretraining"]:
        log(f"sweep: pre-training {group['key'][:12]} computed in {group['computed_in']}, shared with "
            f"{', '.join(group['shared_with']) or 'no other point'}")
    _refresh(sweep, cfg, state, points, privacy=False)
    pre_jobs = [Job("pretrain", str(sweep.run(owner).path), owner.name) for owner, _ in groups.values()
                if not _pretrain_done(sweep.run(owner))]
    failed = run_queue(pre_jobs, devices, run_job, on_start=lambda j: log(f"sweep: pre-training in {j.point}"),
                       on_end=lambda j, s, e: log(f"sweep: pre-training in {j.point} " + (
                           f"done in {s:.1f} s" if e is None else f"FAILED: {e}")))
    for owner, members in groups.values():
        if _pretrain_done(sweep.run(owner)):
            for member in members:
                if not _pretrain_done(sweep.run(member)):
                    share_pretraining(sweep.run(owner), sweep.run(member))
    blocked = {j.point for j, _ in failed} | {m.name for j, _ in failed for o, ms in groups.values()
                                              if o.name == j.point for m in ms}
    todo = [p for p in points if not sweep.run(p).timings_path.is_file() and p.name not in blocked]
    progress = SweepProgress(len(points), sum(sweep.run(p).timings_path.is_file() for p in points),
                             workers=len(devices), log=log)
    progress.log(progress.line())

    def ended(job: Job, seconds, error) -> None:
        progress.finished(seconds)
        if error:
            log(f"sweep: {job.point} FAILED: {error}")
        _refresh(sweep, cfg, state, points, privacy=False)

    try:
        failed += run_queue([Job("finish", str(sweep.run(p).path), p.name) for p in todo], devices, run_job,
                            on_start=lambda job: progress.started(), on_end=ended)
    finally:
        progress.close()
    _refresh(sweep, cfg, state, points)
    log(f"sweep done in {time.perf_counter() - t0:.1f} s: {sweep.path} ({sweep.md_path.name}, {sweep.png_path.name})")
    if failed:
        raise RunDirError(f"{len(failed)} job(s) of the sweep failed (" + "; ".join(f"{j.point}: {e}" for j, e in failed)
                          + f"); fix the cause, then `privimage sweep --resume {sweep.path}` finishes only those.")


def _make_point(run: RunDir, cfg: RunConfig, num_sensitive: int) -> None:
    """The point's run directory with its config, budget and plan (as ``privimage run`` starts one); nothing is
    rewritten once its budget.json exists (the ledger is the record of what was spent)."""
    from privimage.pipeline import write_run_plan
    from privimage.preflight import plan_budget

    if run.budget_path.is_file():
        return
    run.path.mkdir(parents=True, exist_ok=True)
    with run.lock("sweep"):
        write_run_plan(run, cfg, plan_budget(cfg, num_sensitive), num_sensitive)


def _queries(sweep: SweepDir, cfg: RunConfig, points: list[Point], sensitive, log) -> None:
    """Each point's own query release from votes counted once per seed (SECRET: in memory only, dropped here)."""
    from privimage.pipeline import load_split, query_spent, stage_query_release
    from privimage.query import query_votes
    from privimage.query.stage import query_classifier

    todo = [p for p in points if not query_spent(sweep.run(p), point_config(cfg, p), log)]
    if not todo:
        return
    public = load_split(cfg, "public")
    counted: dict[int, tuple] = {}  # seed -> (classifier, votes)
    for p in todo:
        pcfg = point_config(cfg, p)
        if p.seed not in counted:
            classifier = query_classifier(pcfg, public, resolution=sensitive.resolution, log=log)
            log(f"query (seed {p.seed}): classifier public accuracy {classifier.public_accuracy:.3f}; votes counted "
                f"once for every point of this seed, kept in memory only")
            counted[p.seed] = classifier, query_votes(classifier, sensitive.images, sensitive.labels,
                                                      num_classes=sensitive.num_classes, top_k=cfg.query.top_k)
        classifier, votes = counted[p.seed]
        run = sweep.run(p)
        with run.lock("sweep (query)", log=log):
            log(f"query: {p.name}: its own release ({p.label})")
            stage_query_release(run, pcfg, classifier=classifier, votes=votes, public=public,
                                sensitive_class_names=sensitive.class_names, log=log)
    counted.clear()


def pretrain_key(run: RunDir, cfg: RunConfig) -> str:
    """What determines a pre-training, hashed: the selected subset's content (images and labels), the
    pre-training config, the UNet and the seed."""
    images, labels = run.load_subset()
    num_classes = len(run.load_selection()["sensitive_class_names"])
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(json.dumps({"pretrain": cfg.to_dict()["pretrain"], "seed": cfg.seed, "shape": list(images.shape),
                         "unet": cfg.unet_config(channels=images.shape[1], num_classes=num_classes).to_dict()},
                        sort_keys=True).encode())
    return h.hexdigest()


def _pretrain_done(run: RunDir) -> bool:
    from privimage.pipeline import pretrain_finished

    return pretrain_finished(run)


def _pretrain_groups(sweep: SweepDir, cfg: RunConfig, points: list[Point]) -> dict:
    """key -> (the point that computes it, the other points that share it); finished or started ones first."""
    if not cfg.pretrain.steps:
        return {}
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(pretrain_key(sweep.run(p), point_config(cfg, p)), []).append(p)

    def rank(p: Point) -> int:
        run = sweep.run(p)
        return 0 if _pretrain_done(run) else 1 if run.checkpoint_path("pretrain").is_file() else 2

    out = {}
    for key, members in groups.items():
        owner = min(members, key=rank)  # stable: the first point at equal rank
        out[key] = (owner, [m for m in members if m != owner])
    return out


def share_pretraining(src: RunDir, dst: RunDir) -> None:
    """``src``'s finished pre-training outputs into ``dst``, hard-linked (else copied) and read-only: the
    checkpoint, its log, its grids; the final grid last (the mark of a finished pre-training)."""
    files = [src.checkpoint_path("pretrain"), src.log_path("pretrain"),
             *sorted(src.samples_dir.glob("pretrain-*.png")), src.training_grid_path("pretrain")]
    for f in (f for f in files if f.is_file()):
        target = dst.path / f.relative_to(src.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.sweep-link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(f, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)


def _refresh(sweep: SweepDir, cfg: RunConfig, state: dict, points: list[Point], *, privacy: bool = True) -> None:
    """sweep.json, sweep.md and sweep.png from the point directories as they are now."""
    from privimage.sweep.summary import compose_points, point_summary, write_summary

    shared = {m: g["key"][:12] for g in state.get("pretraining", []) for m in [g["computed_in"], *g["shared_with"]]}
    state["points"] = [{**point_summary(sweep, p), "pretrain": shared.get(p.name)} for p in points]
    if privacy:
        state["privacy"] = compose_points(sweep, points, delta=cfg.delta)
    sweep.save(state)
    write_summary(sweep, state, points, secure=cfg.finetune.secure_noise)


# ------------------------------------------------------------------------------------------------------------
# One job, in whichever process runs it

_SENSITIVE: dict = {}


def _data_key(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict()["data"], sort_keys=True)


def run_job(job: Job, device: str) -> None:
    """``job`` on ``device``, holding its run directory's lock: a pre-training, or the rest of a point."""
    from privimage.pipeline import continue_run, load_split, stage_pretrain

    run = RunDir(job.path)
    cfg = run.load_config()
    cfg = replace(cfg, device=device) if device != cfg.device else cfg
    with run.lock(f"sweep ({job.kind})"):
        if job.kind == "pretrain":
            stage_pretrain(run, cfg, resume=run.checkpoint_path("pretrain").is_file())
            return
        key = _data_key(cfg)
        if key not in _SENSITIVE:
            _SENSITIVE[key] = load_split(cfg, "sensitive")
        continue_run(run, cfg, _SENSITIVE[key])
