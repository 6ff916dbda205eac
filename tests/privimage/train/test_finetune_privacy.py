"""The DP fine-tune's privacy contract around the engine (issue 13): secret per-record randomness, so one
record moves the clipped sum by at most C, and a ledger that is on disk before anything derived from it."""

import json
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from privimage.config import FinetuneConfig
from privimage.data import load_dataset
from privimage.diffusion import EDMDenoiser, EDMLoss, to_model_range
from privimage.engine import DPEngine, Mechanism, PrivacyBudget
from privimage.privacy import FINETUNE
from privimage.engine.sampling import PhysicalBatch
from privimage.models import UNet
from privimage.models.unet import PRESETS
from privimage.train import PerRecordRandomness, accumulate_micro_batch, finetune, load_checkpoint
from privimage.train.common import step_generator

UNET = replace(PRESETS["tiny"], nf=8, ch_mult=(1,), attn_resolutions=(8,), resolution=8, num_classes=5)
C = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def cheap_epsilon(monkeypatch):
    """The loop logs ε after each logged step (seconds of accounting each); these tests are about other things."""
    monkeypatch.setattr(PrivacyBudget, "epsilon_spent", lambda self: SimpleNamespace(upper=0.0))


@pytest.fixture(scope="module")
def data():
    return load_dataset("embedded", split="sensitive", size=48, resolution=8, seed=3)


def _clipped_sum(denoiser, draw_and_accumulate) -> torch.Tensor:
    """The engine's clipped sum (σ = 0, divisor 1) of one micro-batch, flattened over all parameters."""
    engine = DPEngine(denoiser, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=1.0)
    draw_and_accumulate(engine)
    engine.finalize()
    engine.close()
    out = torch.cat([p.grad.flatten() for p in denoiser.parameters()])
    denoiser.zero_grad(set_to_none=True)
    return out


def _batch(records: list[int], size: int) -> PhysicalBatch:
    indices = torch.zeros(size, dtype=torch.long)
    indices[:len(records)] = torch.tensor(records)
    return PhysicalBatch(indices, torch.arange(size) >= len(records))


def test_adding_one_record_anywhere_in_a_micro_batch_moves_the_clipped_sum_by_at_most_c(data):
    """Everything public fixed AND the secret key fixed: the coupling the DP proof uses must hold exactly.

    Record 8 (new) is inserted at every position among records 0-7. Keyed by record, the others keep their
    draws and the sum moves by at most C. The old scheme (one generator per micro-batch from the public seed,
    handed out by position) fails the same check: inserting at the front shifts every later record's draws.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the bound is exact; float64 keeps round-off far below 1e-6·C
    try:
        torch.manual_seed(0)
        denoiser = EDMDenoiser(UNet(UNET))
        loss = EDMLoss(num_noise=2, label_dropout=0.1)
        randomness = PerRecordRandomness.fresh()
        images, labels, others, step = data.images[:9], data.labels[:9], list(range(8)), 3

        def keyed(records):
            return lambda engine: accumulate_micro_batch(engine, loss, randomness, images=images, labels=labels,
                                                         batch=_batch(records, 10), step=step, num_classes=5)

        base = _clipped_sum(denoiser, keyed(others))
        moved = [float((_clipped_sum(denoiser, keyed(others[:p] + [8] + others[p:])) - base).norm()) / C
                 for p in range(len(others) + 1)]
        assert max(moved) <= 1 + 1e-6, moved
        assert min(moved) > 0.5, moved  # the added record's clipped gradient itself is there (norm C)

        def positional(records):  # the scheme issue 13 found: draws by position, from the public seed
            def run(engine):
                batch = _batch(records, 10)
                x = to_model_range(images[batch.indices])
                drawn = loss.draw(x, labels[batch.indices], num_classes=5,
                                  generator=step_generator(0, 2, step, 0))
                engine.accumulate(lambda m: loss.compute(m, x, *drawn), is_padding=loss.rows(batch.is_padding),
                                  groups=loss.groups(10))
            return run

        old_base = _clipped_sum(denoiser, positional(others))
        old_moved = float((_clipped_sum(denoiser, positional([8] + others)) - old_base).norm()) / C
        assert old_moved > 1 + 1e-6, old_moved
    finally:
        torch.set_default_dtype(default)


def test_a_record_draws_the_same_wherever_it_sits_and_whoever_shares_its_batch():
    loss = EDMLoss(num_noise=3, label_dropout=0.5)
    randomness = PerRecordRandomness.insecure_from_seed(1)
    x = torch.zeros(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 3])
    a = loss.draw_per_record(x, labels, num_classes=4, generators=randomness.generators(5, [10, 11, 12, 13]))
    b = loss.draw_per_record(x[:3], labels[[2, 0, 3]], num_classes=4,
                             generators=randomness.generators(5, [12, 99, 13]))
    assert torch.equal(b[1][:3], a[1][6:9]) and torch.equal(b[2][6:9], a[2][9:12])  # record 12, then 13
    assert b[0][0] == a[0][2]
    padded = loss.draw_per_record(x[:2], labels[:2], num_classes=4, generators=[None, randomness.generator(5, 10)])
    assert torch.equal(padded[2][:3], torch.zeros(3, 1, 2, 2)) and torch.equal(padded[1][3:], a[1][:3])
    with pytest.raises(ValueError, match="one generator per image"):
        loss.draw_per_record(x, labels, num_classes=4, generators=randomness.generators(5, [1, 2]))
    other_step = loss.draw_per_record(x, labels, num_classes=4, generators=randomness.generators(6, [10, 11, 12, 13]))
    assert not torch.equal(other_step[2], a[2])


def _budget(steps=4):
    return PrivacyBudget(8.0, 1e-4, plan={FINETUNE: Mechanism(1.0, 0.25, steps)})


def _run(run_dir, data, *, secure=False, **kw):
    budget = kw.pop("budget", None) or _budget()
    config = FinetuneConfig(physical_batch_size=8, num_noise=2, max_grad_norm=1e-2, lr=1e-3, secure_noise=secure,
                            **{k: kw.pop(k) for k in ("checkpoint_every", "log_every", "sample_every") if k in kw})
    return finetune(run_dir, config, images=data.images[:24], labels=data.labels[:24], unet=UNET, budget=budget,
                    init_state=None, seed=5, log=kw.pop("log", lambda *_: None), **kw)


@pytest.mark.usefixtures("cheap_epsilon")
def test_secure_fine_tunes_draw_a_fresh_secret_key_and_keep_it_in_the_checkpoint_only(tmp_path, data):
    keys = [load_checkpoint(_run(tmp_path / name, data, secure=True, stop_at_step=1))["loss_randomness"]
            for name in ("a", "b")]
    assert keys[0]["secure"] and keys[1]["secure"] and keys[0]["key"] != keys[1]["key"]
    assert PerRecordRandomness.insecure_from_seed(5).state_dict()["key"] not in (keys[0]["key"], keys[1]["key"])
    assert "key" not in repr(PerRecordRandomness.from_state_dict(keys[0]))
    messages = []
    _run(tmp_path / "c", data, stop_at_step=1, log=messages.append)
    assert any("NOT private" in m for m in messages)


def _ledger(run_dir) -> int:
    path = run_dir / "budget.json"
    return json.loads(path.read_text())["spent"].get(FINETUNE, 0) if path.is_file() else 0


def _derived_steps(run_dir) -> dict[str, int]:
    """Every file on disk derived from fine-tune steps, with the last step it depends on."""
    found = {}
    ckpt = run_dir / "checkpoints" / "finetune.pt"
    if ckpt.is_file():
        found[str(ckpt)] = load_checkpoint(ckpt)["step"]
    log = run_dir / "logs" / "finetune.csv"
    if log.is_file():
        found[str(log)] = max(int(line.split(",")[0]) for line in log.read_text().splitlines()[1:])
    for grid in run_dir.glob("samples/finetune-*.png"):
        found[str(grid)] = int(grid.stem.split("-")[1])
    return found


@pytest.mark.usefixtures("cheap_epsilon")
def test_every_output_on_disk_is_counted_by_the_ledger_at_every_crash_point(tmp_path, data, monkeypatch):
    """A crash injected before each write of a short fine-tune (checkpoints at 2 and 4, a grid due at 3, so
    written at 4): whatever is on disk, the ledger on disk counts every step it derives from; a fresh start
    over it is refused, and --resume finishes with the parameters of the uninterrupted run."""
    kw = dict(checkpoint_every=2, sample_every=3, log_every=1)
    real_replace = os.replace
    targets = []

    def counting(src, dst):
        targets.append(os.path.relpath(dst, tmp_path))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting)
    full = load_checkpoint(_run(tmp_path / "full", data, **kw))
    writes = list(targets)
    assert [os.path.basename(t) for t in writes] == ["budget.json", "finetune.pt", "finetune.csv"] * 2 + [
        "finetune-000004.png"]

    for crash_at in range(len(writes)):
        run_dir = tmp_path / f"crash{crash_at}"
        count = [0]

        def crashing(src, dst, crash_at=crash_at):
            count[0] += 1
            if count[0] > crash_at:
                raise OSError("injected crash")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(OSError, match="injected crash"):
            _run(run_dir, data, **kw)
        monkeypatch.setattr(os, "replace", real_replace)
        ledger, derived = _ledger(run_dir), _derived_steps(run_dir)
        assert all(step <= ledger for step in derived.values()), (crash_at, ledger, derived)
        if not derived and not ledger:
            continue
        with pytest.raises(ValueError, match="new run directory"):
            _run(run_dir, data, budget=PrivacyBudget.from_state_dict(json.loads((run_dir / "budget.json").read_text())),
                 **kw)
        if (run_dir / "checkpoints" / "finetune.pt").is_file():
            resumed = load_checkpoint(_run(run_dir, data, resume=True, **kw))
            assert all(torch.equal(resumed["model"][k], v) for k, v in full["model"].items()), crash_at
            assert _ledger(run_dir) == 4


def test_dropout_is_refused_its_masks_would_come_from_the_public_global_generator(tmp_path, data):
    with pytest.raises(ValueError, match="dropout=0.1"):
        finetune(tmp_path, FinetuneConfig(), images=data.images, labels=data.labels, unet=replace(UNET, dropout=0.1),
                 budget=_budget(), init_state=None, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


def test_outputs_without_a_ledger_entry_refuse_a_fresh_start(tmp_path, data):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "finetune-000002.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"already holds fine-tune outputs \(samples/finetune-000002.png\)"):
        _run(tmp_path, data)
    assert not (tmp_path / "checkpoints").exists()
