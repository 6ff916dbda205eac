"""The pipeline audit: canary images through the real DP fine-tune pass it, and each planted bug is caught.

The CI-sized audit (12 fine-tunes × 127 canaries per case, one step each) seeds the canary bits, the DP noise
and the auditor's draws (``reproducible``); the fine-tune's diffusion randomness stays secret (OS entropy),
which moves ε_lb little. bench/audit.py runs larger audits, and repeats this size, with the OS's entropy.
"""

import importlib
import json

import pytest
import torch

from privimage.audit import (
    AuditSettings,
    PlantedBug,
    audit_engine,
    canary_directions,
    canary_images,
    class_columns,
    crafted_init,
    run_audit,
)
from privimage.cli import main
from threads import one_torch_thread as on_one_thread
from privimage.diffusion import EDMDenoiser, EDMLoss, to_model_range
from privimage.engine import DPEngine
from privimage.engine.auditing import AuditingEngine
from privimage.models.unet import UNet

CI = AuditSettings(runs=12, steps=1)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def results():
    with on_one_thread():
        return {r.bug: r for r in run_audit(CI, reproducible=0, log=lambda *_: None)}


@pytest.mark.slow
def test_the_pipeline_is_consistent_with_its_claim(results):
    result = results[PlantedBug.NONE]
    assert 1.9 < result.claimed_epsilon <= 2.0
    assert result.bound.m == CI.canaries == 1524
    assert result.epsilon_lb <= result.claimed_epsilon
    assert abs(result.replay_correlation) < 0.05  # the secure noise is not the public seed's


@pytest.mark.slow
@pytest.mark.parametrize("bug", [PlantedBug.NOISE_QUARTER, PlantedBug.PER_ROW_CLIPPING, PlantedBug.PUBLIC_SEED_NOISE])
def test_each_planted_bug_pushes_the_bound_above_the_claim(results, bug):
    result = results[bug]
    assert result.epsilon_lb > result.claimed_epsilon, result
    assert (result.replay_correlation > 0.99) == (bug is PlantedBug.PUBLIC_SEED_NOISE)


@pytest.mark.slow
def test_the_engine_seam_is_put_back(results):
    assert importlib.import_module("privimage.train.finetune").DPEngine is DPEngine


def test_crafted_init_gives_each_class_its_own_gradient_coordinates():
    settings = AuditSettings(width=8, resolution=4)
    config = settings.unet()
    net = UNet(config)
    net.load_state_dict(crafted_init(config, seed=0))
    denoiser = EDMDenoiser(net)
    images, labels = canary_images(settings)
    x, y = to_model_range(images[:3]), labels[:3]
    out = denoiser(x, torch.full((3,), 0.5), y)
    assert torch.isfinite(out).all() and out.abs().max() < 10  # the forward keeps its usual scale
    names = set(class_columns(config))
    loss = EDMLoss(num_noise=4, label_dropout=0.0)
    grads = []
    for i in range(3):
        rows = loss(denoiser, x[i:i + 1], y[i:i + 1], generator=torch.Generator().manual_seed(i))
        g = dict(zip([n for n, _ in denoiser.named_parameters()], torch.autograd.grad(rows.sum(),
                                                                                       list(denoiser.parameters()))))
        own = sum(g[n][:, i].square().sum() for n in names)
        total = sum(t.square().sum() for t in g.values())
        assert own / total > 0.99  # the canary's gradient is (nearly) all in column i of the blocks' temb weights
        grads.append(torch.cat([t.flatten() for t in g.values()]))
    flat = torch.stack(grads)
    cos = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    assert (cos - torch.eye(3)).abs().max() < 0.02  # different canaries: orthogonal gradients


def test_directions_match_what_the_engine_adds_for_a_canary():
    settings = AuditSettings(width=8, resolution=4, direction_draws=8)
    config = settings.unet()
    state = crafted_init(config, seed=0)
    directions = canary_directions(state, settings, generator=torch.Generator().manual_seed(1))
    net = UNet(config)
    net.load_state_dict(state)
    denoiser = EDMDenoiser(net)
    images, labels = canary_images(settings)
    x = to_model_range(images)
    loss = EDMLoss(num_noise=4, label_dropout=0.0)
    seen = []
    engine = AuditingEngine(denoiser, max_grad_norm=1e-3, noise_multiplier=0.0, expected_batch_size=1.0,
                            on_release=seen.append)
    drawn = loss.draw(x, labels, num_classes=config.num_classes, generator=torch.Generator().manual_seed(2))
    engine.step(lambda m: loss.compute(m, x, *drawn), groups=loss.groups(len(x)))
    engine.close()
    names = class_columns(config)
    added = torch.cat([seen[0][n].double().T for n in names], dim=1)[labels]  # (canaries, D): each one's sum
    capture = (added * directions).sum(1) / 1e-3
    assert capture.min() > 0.6 and capture.mean() > 0.9  # on average the engine adds ≈ C along it


def test_engine_level_audit_passes_the_engine_and_catches_the_bugs():
    settings = AuditSettings(runs=8, steps=1)
    results = {r.bug: r for r in audit_engine(settings, reproducible=0)}
    assert results[PlantedBug.NONE].epsilon_lb <= results[PlantedBug.NONE].claimed_epsilon
    for bug in (PlantedBug.NOISE_QUARTER, PlantedBug.PER_ROW_CLIPPING, PlantedBug.PUBLIC_SEED_NOISE):
        assert results[bug].epsilon_lb > results[bug].claimed_epsilon, bug


def test_cli_prints_claim_and_bound_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    code = main(["audit", "--runs", "1", "--steps", "1", "--width", "4", "--cases", "none,noise-quarter",
                 "--reproducible", "0", "--json", str(out), "--markdown", str(tmp_path / "audit.md")])
    text = capsys.readouterr().out
    assert code == 0
    assert "| pipeline | none |" in text and "| engine | noise-quarter |" in text and "claimed ε" in text
    rows = json.loads(out.read_text())
    assert [(r["level"], r["bug"]) for r in rows] == [("engine", "none"), ("engine", "noise-quarter"),
                                                        ("pipeline", "none"), ("pipeline", "noise-quarter")]
    assert rows[2]["bound"]["m"] == 15 and rows[2]["claimed_epsilon"] <= 2.0
    assert (tmp_path / "audit.md").read_text().startswith("| level | case |")


def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(ValueError, match="width=6"):
        AuditSettings(width=6)
    with pytest.raises(ValueError, match="runs=0"):
        AuditSettings(runs=0)


def test_unknown_case_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--cases", "none,typo"])
    assert exit_info.value.code == 2
    assert "typo" in capsys.readouterr().err
