"""`privimage sweep` on a shortened `test` config (non-secure test mode: reproducible from the seeds): each point
equals a standalone `privimage run`; pre-training is shared exactly when the selected subsets match; a sweep
killed mid-point and between points resumes to the same result without spending twice; `inf` is labelled
non-private; the composition covers every point; bad input is refused in one line with nothing written."""

import json
import os

import numpy as np
import pytest
import torch

from privimage.cli import main
from privimage.sweep.plan import NO_CLIPPING
from cli_runs import module_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The `test` preset with a 4-step fine-tune (checkpoints at 2 and 4): a resume mid-fine-tune has a checkpoint.
CONFIG = {"base": "test", "finetune": {"epochs": 1.0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, class cache, the 2 eps x 2 seeds sweep directory) made once for the module."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = tmp / "test.json"
    config.write_text(json.dumps(CONFIG))
    with module_cli(tmp):
        assert main(["sweep", "--config", str(config), "--epsilons", "1,10", "--seeds", "0,1", "--devices", "cpu",
                     "--out", str(tmp / "runs")]) == 0
    return config, tmp / "cache", tmp / "runs" / "00000-sweep-test"


def _ema(run_dir):
    return torch.load(run_dir / "checkpoints" / "finetune.pt", weights_only=True)["ema"]["module"]


def _same_point(ours, theirs):
    """The same parameters, ledger, query release and samples."""
    a, b = _ema(ours), _ema(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ours / "budget.json").read_text()) == json.loads((theirs / "budget.json").read_text())
    assert np.array_equal(np.load(ours / "query" / "histogram.npy"), np.load(theirs / "query" / "histogram.npy"))
    with np.load(ours / "samples" / "samples.npz") as x, np.load(theirs / "samples" / "samples.npz") as y:
        assert np.array_equal(x["images"], y["images"]) and np.array_equal(x["labels"], y["labels"])


def test_each_point_equals_a_standalone_run_and_pretraining_is_shared(setup, tmp_path, monkeypatch):
    config, cache, sweep = setup
    state = json.loads((sweep / "sweep.json").read_text())
    assert [p["name"] for p in state["points"]] == ["eps1-seed0", "eps1-seed1", "eps10-seed0", "eps10-seed1"]
    assert all(p["status"] == "done" for p in state["points"])
    # points share a pre-training exactly when they have the same seed and selected the same subset; a shared
    # one is computed once and linked read-only into the others (seed 0's two points select the same classes)
    group_of = {m: g["computed_in"] for g in state["pretraining"] for m in [g["computed_in"], *g["shared_with"]]}
    assert len(group_of) == 4 and group_of["eps10-seed0"] == "eps1-seed0"

    def subset(name):
        with np.load(sweep / name / "query" / "subset.npz") as z:
            return z["images"].tobytes() + z["labels"].tobytes()

    for a in group_of:
        for b in group_of:
            same = a[-5:] == b[-5:] and subset(a) == subset(b)
            assert (group_of[a] == group_of[b]) == same, (a, b)
            x, y = ((sweep / n / "checkpoints" / "pretrain.pt").stat() for n in (a, b))
            assert ((x.st_ino, x.st_dev) == (y.st_ino, y.st_dev)) == same, (a, b)
            if same and a != b:
                assert not x.st_mode & 0o222  # read-only
    # a standalone run at (10, 1) makes what the sweep's point made
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    assert main(["run", "--config", str(config), "--epsilon", "10", "--seed", "1", "--out", str(tmp_path)]) == 0
    alone = tmp_path / "00000-test"
    _same_point(sweep / "eps10-seed1", alone)
    assert json.loads((sweep / "eps10-seed1" / "config.json").read_text()) == json.loads(
        (alone / "config.json").read_text())
    ours, theirs = (torch.load(d / "checkpoints" / "pretrain.pt", weights_only=True)["ema"]["module"]
                    for d in (sweep / "eps10-seed1", alone))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the shared pre-training is this point's own
    for rel in ("release/model.safetensors", "release/PRIVACY.md", "logs/timings.json", "samples/grid.png"):
        assert (sweep / "eps10-seed1" / rel).is_file(), rel


def test_composition_covers_every_point(setup):
    from privimage.engine import Mechanism, compose_epsilon

    _, _, sweep = setup
    privacy = json.loads((sweep / "sweep.json").read_text())["privacy"]
    singles = privacy["points"]
    assert set(singles) == {"eps1-seed0", "eps1-seed1", "eps10-seed0", "eps10-seed1"}
    assert all(privacy["composed_epsilon"] >= eps for eps in singles.values())
    assert singles["eps10-seed0"] == pytest.approx(10, abs=0.05)
    # the independent sum of the parts bounds it from above (composition is tighter than adding)
    assert privacy["composed_epsilon"] <= sum(singles.values())
    mechanisms = []
    for name in singles:
        plan = json.loads((sweep / name / "budget.json").read_text())["plan"]
        mechanisms += [Mechanism(**m) for m in plan.values()]
    assert privacy["composed_epsilon"] == pytest.approx(compose_epsilon(mechanisms, delta=privacy["delta"]).upper)
    text = (sweep / "sweep.md").read_text()
    assert f"{privacy['composed_epsilon']:.4g}" in text and "best" in text and "NOT PRIVATE" in text  # test mode
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_mid_point_and_between_points_then_resume(setup, tmp_path, monkeypatch):
    """A sweep stopped inside eps1's fine-tune, resumed and stopped before eps10, resumed again, ends as the
    uninterrupted sweep did: the same points, each query spent once, every fine-tune step counted once."""
    import privimage.pipeline
    import privimage.sweep

    config, cache, whole = setup
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    args = ["sweep", "--config", str(config), "--epsilons", "1,10", "--seeds", "0", "--devices", "cpu",
            "--out", str(tmp_path)]
    real_finetune = privimage.pipeline.stage_finetune

    def killed_mid_finetune(run_dir, cfg, **kw):
        real_finetune(run_dir, cfg, **{**kw, "stop_at_step": 2})
        raise KeyboardInterrupt

    monkeypatch.setattr(privimage.pipeline, "stage_finetune", killed_mid_finetune)
    assert main(args) == 130
    sweep = tmp_path / "00000-sweep-test"
    budget = json.loads((sweep / "eps1-seed0" / "budget.json").read_text())
    assert budget["spent"] == {"query": 1, "finetune": 2}
    assert not (sweep / "eps10-seed0" / "checkpoints" / "finetune.pt").exists()
    monkeypatch.setattr(privimage.pipeline, "stage_finetune", real_finetune)

    real_job = privimage.sweep.run_job

    def killed_before_eps10(job, device):
        if job.point == "eps10-seed0" and job.kind == "finish":
            raise KeyboardInterrupt
        real_job(job, device)

    monkeypatch.setattr(privimage.sweep, "run_job", killed_before_eps10)
    assert main(["sweep", "--resume", str(sweep), "--devices", "cpu"]) == 130
    assert (sweep / "eps1-seed0" / "logs" / "timings.json").is_file()
    finished = (sweep / "eps1-seed0" / "checkpoints" / "finetune.pt").stat().st_mtime_ns
    monkeypatch.setattr(privimage.sweep, "run_job", real_job)

    assert main(["sweep", "--resume", str(sweep), "--config", str(config)]) == 0
    assert (sweep / "eps1-seed0" / "checkpoints" / "finetune.pt").stat().st_mtime_ns == finished  # left alone
    for name in ("eps1-seed0", "eps10-seed0"):
        _same_point(sweep / name, whole / name)
        steps = json.loads((sweep / name / "plan.json").read_text())["finetune_steps"]
        assert json.loads((sweep / name / "budget.json").read_text())["spent"] == {"query": 1, "finetune": steps}


def test_inf_is_the_labelled_non_private_reference_and_distinct_subsets_pretrain_twice(setup, tmp_path, monkeypatch):
    import privimage.pipeline
    from privimage.rundir import RunDir

    config, cache, _ = setup
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    real_release = privimage.pipeline.stage_query_release

    def one_image_fewer_at_eps10(run_dir, cfg, **kw):  # a stub: eps10's subset differs from any other
        label_map = real_release(run_dir, cfg, **kw)
        if cfg.epsilon == 10 and not cfg.non_private:
            run = RunDir.of(run_dir)
            images, labels = run.load_subset()
            run.save_subset(images[1:].numpy(), labels[1:].numpy())
        return label_map

    monkeypatch.setattr(privimage.pipeline, "stage_query_release", one_image_fewer_at_eps10)
    assert main(["sweep", "--config", str(config), "--epsilons", "10,inf", "--out", str(tmp_path)]) == 0
    sweep = tmp_path / "00000-sweep-test"
    state = json.loads((sweep / "sweep.json").read_text())
    assert sorted((g["computed_in"], g["shared_with"]) for g in state["pretraining"]) == [
        ("eps10-seed0", []), ("epsinf-seed0", [])]
    assert (sweep / "eps10-seed0" / "checkpoints" / "pretrain.pt").stat().st_ino != (
        sweep / "epsinf-seed0" / "checkpoints" / "pretrain.pt").stat().st_ino
    inf = {p["name"]: p for p in state["points"]}["epsinf-seed0"]
    assert inf["private"] is False and inf["epsilon"] == "inf" and inf["finetune_noise_multiplier"] == 0
    assert list(state["privacy"]["points"]) == ["eps10-seed0"]
    assert state["privacy"]["non_private_points"] == ["epsinf-seed0"]
    ref = sweep / "epsinf-seed0"
    assert json.loads((ref / "config.json").read_text())["non_private"] is True
    assert json.loads((ref / "config.json").read_text())["finetune"]["max_grad_norm"] == NO_CLIPPING  # no clipping
    assert "NOT PRIVATE" in json.loads((ref / "plan.json").read_text())["non_private"]
    statement = json.loads((ref / "release" / "privacy.json").read_text())
    assert statement["private"] is False and "non-private reference" in statement["guarantee"]
    assert "non-private reference" in (ref / "release" / "PRIVACY.md").read_text()
    assert "NON-PRIVATE" in (sweep / "sweep.md").read_text()


def test_two_shards_cover_the_sweep_once_and_a_shard_equals_the_unsharded_points(setup, tmp_path, monkeypatch,
                                                                                 capsys):
    """--shard i/n: the two shards' points partition the sweep (j % n == i); shard 1/2, stopped between its points
    and resumed, keeps its shard (a conflicting --shard is refused) and makes the unsharded sweep's points."""
    import privimage.sweep

    config, cache, whole = setup
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    args = ["sweep", "--config", str(config), "--epsilons", "1,10", "--seeds", "0,1", "--devices", "cpu",
            "--out", str(tmp_path)]
    held = {}
    for i in (0, 1):
        assert main([*args, "--shard", f"{i}/2", "--dry-run"]) == 0
        plan = json.loads(capsys.readouterr().out)
        held[i] = plan["shard"]["points"]
        assert [p["name"] for p in plan["points"]] == held[i] and set(plan["privacy_if_all_published"]["points"]) == set(
            held[i])
    everything = [p["name"] for p in json.loads((whole / "sweep.json").read_text())["points"]]
    assert held == {0: everything[0::2], 1: everything[1::2]} and sorted(held[0] + held[1]) == sorted(everything)
    assert not os.listdir(tmp_path)  # dry runs write nothing

    real_job = privimage.sweep.run_job

    def killed_before_its_second_point(job, device):
        if job.point == held[1][1] and job.kind == "finish":
            raise KeyboardInterrupt
        real_job(job, device)

    monkeypatch.setattr(privimage.sweep, "run_job", killed_before_its_second_point)
    assert main([*args, "--shard", "1/2"]) == 130
    monkeypatch.setattr(privimage.sweep, "run_job", real_job)
    (sweep,) = tmp_path.iterdir()
    assert sweep.name == "00000-sweep-test-shard1of2"
    capsys.readouterr()
    assert main(["sweep", "--resume", str(sweep), "--shard", "0/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--shard 0/2 differs from the sweep's shard 1/2" in err and len(err.splitlines()) == 1
    assert main(["sweep", "--resume", str(sweep)]) == 0
    state = json.loads((sweep / "sweep.json").read_text())
    assert state["shard"] == {"index": 1, "count": 2} and state["epsilons"] == [1.0, 10.0] and state["seeds"] == [0, 1]
    assert [p["name"] for p in state["points"]] == held[1] and all(p["status"] == "done" for p in state["points"])
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(held[1])  # no other point was made
    assert set(state["privacy"]["points"]) == set(held[1])
    for name in held[1]:
        _same_point(sweep / name, whole / name)
    assert f"Shard 1/2** of a sweep of 4 points" in (text := (sweep / "sweep.md").read_text())
    assert ", ".join(held[1]) in text


@pytest.mark.parametrize("flags, message", [
    (["--epsilons", ""], "--epsilons is empty"),
    (["--epsilons", "1,-5"], "-5 is not an epsilon"),
    (["--epsilons", "1,5,1.0"], "1.0 is given twice"),
    (["--epsilons", "inf,inf"], "inf is given twice"),
    (["--epsilons", "1", "--seeds", "0,0"], "0 is given twice"),
    (["--epsilons", "1", "--devices", "tpu"], "'tpu' is not a device"),
    (["--epsilons", "1", "--devices", "cuda:7"], "cuda:7"),
    (["--epsilons", "1", "--shard=3/2"], "the shard index must be in 0..1"),
    (["--epsilons", "1", "--shard=-1/2"], "the shard index must be in 0..1"),
    (["--epsilons", "1", "--shard", "a/b"], "'a/b' is not i/n"),
    (["--epsilons", "1", "--shard", "0/0"], "must be at least 1"),
    (["--epsilons", "1,10", "--shard", "2/3"], "shard 2 holds none"),
])
def test_bad_input_is_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    if "cuda:7" in flags and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["sweep", "--config", "test", "--out", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_foreign_or_wrong_directory(setup, tmp_path, capsys):
    _, _, sweep = setup
    before = {p: p.read_bytes() for p in (sweep / "sweep.json", sweep / "eps1-seed0" / "budget.json")}
    listing = sorted(os.listdir(sweep))
    for args, message in ((["--resume", str(sweep), "--config", "demo"], "made with config 'test'"),
                          (["--resume", str(sweep), "--shard", "0/2"], "(it is not sharded: all its points)"),
                          (["--resume", str(sweep), "--epsilons", "1,5"], "differs from the sweep's"),
                          (["--resume", str(sweep / "eps1-seed0")], "a run directory of `privimage run`"),
                          (["--resume", str(tmp_path)], "not a sweep directory")):
        assert main(["sweep", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(sweep)) == listing
