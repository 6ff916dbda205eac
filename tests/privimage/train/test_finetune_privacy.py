"""The DP fine-tune's privacy contract around the engine (issue 13): secret per-record randomness, so one
record moves the clipped sum by at most C, and a ledger that is on disk before anything derived from it."""

import json
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from privimage.config import FinetuneConfig
from privimage.data import load_dataset
from privimage.diffusion import EDMDenoiser, EDMLoss, to_model_range
from privimage.diffusion.edm import LABEL_DROPOUT_STREAM, LOG_SIGMA_STREAM, NOISE_STREAM
from privimage.engine import DPEngine, Mechanism, PrivacyBudget
from privimage.privacy import FINETUNE
from privimage.engine.sampling import PhysicalBatch
from privimage.models import UNet
from privimage.models.unet import PRESETS
from privimage.randomness import CHUNK_WORDS, RecordRandomness
from privimage.train import accumulate_micro_batch, finetune, load_checkpoint
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
        randomness = RecordRandomness.secret()
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


def _draw(loss, randomness, records, *, step=5, pad=(), x=None, labels=None, num_classes=4):
    """draw_per_record for images of ``records`` (padding rows at the positions ``pad``, carrying index 0)."""
    B = len(records)
    x = torch.zeros(B, 1, 2, 3) if x is None else x
    labels = torch.tensor([r % max(num_classes, 1) for r in records]) if labels is None else labels
    is_padding = torch.tensor([j in pad for j in range(B)])
    indices = torch.where(is_padding, 0, torch.tensor(records))
    return loss.draw_per_record(x, labels, num_classes=num_classes, randomness=randomness, step=step,
                                indices=indices, is_padding=is_padding)


def _per_image(drawn, K):
    """(labels, σ (B, K), noise (B, K, C, H, W)) of a draw."""
    labels, sigma, noise = drawn
    return labels, sigma.reshape(-1, K), noise.reshape(-1, K, *noise.shape[1:])


def test_a_record_draws_the_same_wherever_it_sits_and_whoever_shares_its_batch(monkeypatch):
    """Alone or in a batch, in any order, across chunk boundaries: image j's draws are record indices[j]'s."""
    K, loss = 3, EDMLoss(num_noise=3, label_dropout=0.5)
    randomness = RecordRandomness.from_public_seed(1)
    records = list(range(10, 30))
    labels, sigma, noise = _per_image(_draw(loss, randomness, records), K)
    assert 0 < int((labels == 4).sum()) < len(records)   # some dropped, some not: the comparisons below bite
    for others in ([17], [29, 12, 17], [17, 99, 3, 12]):
        l2, s2, n2 = _per_image(_draw(loss, randomness, others), K)
        for j, record in enumerate(others):
            if record in records:
                i = records.index(record)
                assert l2[j] == labels[i] and torch.equal(s2[j], sigma[i]) and torch.equal(n2[j], noise[i])
    # chunks of 2 blocks: a record's 18 noise words are cut inside it and records are split between chunks
    monkeypatch.setitem(CHUNK_WORDS, "cpu", 8)
    chunked = _per_image(_draw(loss, randomness, records), K)
    assert all(torch.equal(a, b) for a, b in zip(chunked, (labels, sigma, noise)))
    # the contract, stated in the streams: record i's noise images are its normals on NOISE_STREAM, etc.
    idx = torch.tensor(records)
    assert torch.equal(noise.flatten(1), randomness.normal(stream=NOISE_STREAM, step=5, indices=idx, n=K * 6))
    z = randomness.normal(stream=LOG_SIGMA_STREAM, step=5, indices=idx, n=K)
    assert torch.allclose(sigma, (z * loss.p_std + loss.p_mean).exp())
    drop = randomness.uniform(stream=LABEL_DROPOUT_STREAM, step=5, indices=idx, n=1)[:, 0] < 0.5
    assert torch.equal(labels == 4, drop)


def test_padding_rows_draw_nothing_and_take_nothing_from_the_others():
    K, loss = 2, EDMLoss(num_noise=2, label_dropout=0.5)
    randomness = RecordRandomness.from_public_seed(2)
    labels, sigma, noise = _per_image(_draw(loss, randomness, [4, 5, 6, 7]), K)
    for pad in ([1], [0, 3], [2, 3], [0, 1, 2, 3]):
        l2, s2, n2 = _per_image(_draw(loss, randomness, [4, 5, 6, 7], pad=pad), K)
        for j in range(4):
            if j in pad:  # no dropout, σ = exp(p_mean), zero noise, whatever index the row carries
                assert l2[j] == (4 + j) % 4 and torch.all(s2[j] == torch.tensor(loss.p_mean).exp())
                assert not n2[j].any()
            else:
                assert l2[j] == labels[j] and torch.equal(s2[j], sigma[j]) and torch.equal(n2[j], noise[j])
    with pytest.raises(ValueError, match="one record index and one bool padding flag per image"):
        loss.draw_per_record(torch.zeros(3, 1, 2, 2), None, randomness=randomness, step=0,
                             indices=torch.arange(2), is_padding=torch.zeros(2, dtype=torch.bool))


def test_steps_streams_and_the_dropout_switch_are_separate():
    K, randomness = 2, RecordRandomness.from_public_seed(3)
    records = list(range(8))
    with_dropout = _draw(EDMLoss(num_noise=K, label_dropout=0.5), randomness, records)
    without = _draw(EDMLoss(num_noise=K, label_dropout=0.0), randomness, records)
    unconditional = _draw(EDMLoss(num_noise=K, label_dropout=0.5), randomness, records, num_classes=0)
    assert not torch.equal(with_dropout[0], without[0]) and not unconditional[0].any()  # no class 0 dropped
    for other in (without, unconditional):  # σ and noise do not shift when the dropout draw is skipped
        assert torch.equal(other[1], with_dropout[1]) and torch.equal(other[2], with_dropout[2])
    next_step = _draw(EDMLoss(num_noise=K, label_dropout=0.5), randomness, records, step=6)
    assert not torch.equal(next_step[1], with_dropout[1]) and not torch.equal(next_step[2], with_dropout[2])
    # σ's normals and the noise's are different streams: on one stream they would be the same first K words
    z = (with_dropout[1].log() - EDMLoss().p_mean) / EDMLoss().p_std
    first_noise = with_dropout[2].reshape(len(records), -1)[:, :K].flatten()
    assert not torch.allclose(z, first_noise, atol=1e-3)


def test_per_record_draws_have_the_loss_distributions():
    """ln σ ~ N(p_mean, p_std²), unit normal noise, label dropout at its rate, over 3000 records (KS, binomial)."""
    loss, randomness = EDMLoss(num_noise=2, label_dropout=0.2), RecordRandomness.from_public_seed(4)
    records = list(range(3000))
    labels, sigma, noise = _draw(loss, randomness, records, x=torch.zeros(3000, 1, 2, 2),
                                 labels=torch.zeros(3000, dtype=torch.long))
    assert stats.kstest(sigma.log().double().numpy(), "norm", args=(loss.p_mean, loss.p_std)).pvalue > 1e-3
    assert stats.kstest(noise.flatten().double().numpy(), "norm").pvalue > 1e-3
    assert stats.kstest(1.1 * noise.flatten().double().numpy(), "norm").pvalue < 1e-6
    assert stats.binomtest(int((labels == 4).sum()), 3000, 0.2).pvalue > 1e-3


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
    assert RecordRandomness.from_public_seed(5).state_dict()["key"] not in (keys[0]["key"], keys[1]["key"])
    assert str(keys[0]["key"]) not in repr(RecordRandomness.from_state_dict(keys[0]))
    messages = []
    _run(tmp_path / "c", data, stop_at_step=1, log=messages.append)
    assert any("NOT private" in m for m in messages)


@pytest.mark.usefixtures("cheap_epsilon")
def test_a_checkpoint_with_the_old_key_format_is_refused_on_resume(tmp_path, data):
    """Per-record BLAKE2b generators (a 32-byte hex key) cannot be replayed: resuming would re-release steps."""
    ckpt = _run(tmp_path, data, stop_at_step=1)
    state = load_checkpoint(ckpt)
    torch.save({**state, "loss_randomness": {"key": "ab" * 32, "secure": True}}, ckpt)
    with pytest.raises(ValueError, match="cannot replay"):
        _run(tmp_path, data, resume=True)


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
