"""The GAN audit: canary records through the real DP discriminator step of finetune_gan pass it, and each planted
bug (noise at σ/4, the discriminator's clipping skipped, noise from the public seed) is caught.

The CI-sized audit (2 fine-tunes × 4095 canaries per case, one discriminator step each) seeds the canary bits and
the DP noise (``reproducible``); the per-record fakes stay secret (OS entropy) and do not enter the scores.
bench/audit.py --kind gan runs a larger audit, and repeats this size, with the OS's entropy."""

import importlib
import json
import math

import pytest
import torch

from privimage.audit_gan import (
    GANAuditSettings,
    canary_directions,
    canary_records,
    crafted_discriminator,
    run_gan_audit,
)
from privimage.cli import main
from threads import one_torch_thread as on_one_thread
from privimage.diffusion import to_model_range
from privimage.engine import DPEngine
from privimage.engine.auditing import PlantedBug
from privimage.gan import pair_groups, paired_rows
from privimage.models import Discriminator

CI = GANAuditSettings()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def results():
    with on_one_thread():
        return {r.bug: r for r in run_gan_audit(CI, reproducible=0, log=lambda *_: None)}


def test_the_gan_pipeline_is_consistent_with_its_claim(results):
    result = results[PlantedBug.NONE]
    assert 1.9 < result.claimed_epsilon <= 2.0
    assert result.level == "gan" and result.bound.m == CI.canaries == 8190
    assert result.epsilon_lb <= result.claimed_epsilon
    assert abs(result.replay_correlation) < 0.05  # the secure noise is not the public seed's


@pytest.mark.parametrize("bug", [PlantedBug.NOISE_QUARTER, PlantedBug.NO_CLIPPING, PlantedBug.PUBLIC_SEED_NOISE])
def test_each_planted_bug_pushes_the_gan_bound_above_the_claim(results, bug):
    result = results[bug]
    assert result.epsilon_lb > result.claimed_epsilon, result
    assert (result.replay_correlation > 0.9) == (bug is PlantedBug.PUBLIC_SEED_NOISE)


def test_the_gan_engine_seam_is_put_back(results):
    assert importlib.import_module("privimage.train.gan_finetune").DPEngine is DPEngine


def test_the_crafted_discriminator_puts_each_pair_gradient_in_its_row_along_the_direction():
    settings = GANAuditSettings(classes=16, width=4)
    gan = settings.gan()
    state = crafted_discriminator(gan, seed=0)
    D = Discriminator(gan)
    D.load_state_dict(state)
    images, labels = canary_records(settings)
    x = to_model_range(images)
    fakes = torch.rand_like(x) * 2 - 1  # any fakes: their hinge term is inactive
    y_fake = torch.randint(16, (len(x),))
    assert torch.equal(D(x, labels), torch.full((len(x),), -2.0))
    C = 1e-3
    engine = DPEngine(D, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=1.0)
    engine.step(lambda m: paired_rows(m, x, labels, fakes, y_fake), groups=pair_groups(len(x)))
    engine.close()
    rows = D.embed.weight.grad[labels].double()  # row j: canary j's clipped pair gradient alone
    assert not D.embed.weight.grad[15].any()  # the background class: no record here, nothing there
    directions = canary_directions(state, settings)
    along = (rows * directions).sum(1) / C
    # ≈ C/√2 along u_j (w carries the other half of the norm), nothing across it
    assert along.min() > 0.99 / math.sqrt(2) and along.max() <= 1 / math.sqrt(2) + 1e-6
    torch.testing.assert_close(rows, along[:, None] * C * directions, rtol=1e-6, atol=1e-12)
    blocks = [p.grad for name, p in D.named_parameters() if name.startswith("blocks.")]
    assert all(not g.any() for g in blocks)  # ∂L/∂h = 0: no gradient below the head


def test_cli_audits_the_gan_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    code = main(["audit", "--kind", "gan", "--runs", "1", "--classes", "64", "--cases", "none,no-clipping",
                 "--reproducible", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "| gan | none |" in text and "| gan | no-clipping |" in text and "engine" not in text
    rows = json.loads(out.read_text())
    assert [(r["level"], r["bug"]) for r in rows] == [("gan", "none"), ("gan", "no-clipping")]
    assert rows[0]["bound"]["m"] == 63 and rows[0]["claimed_epsilon"] <= 2.0


def test_gan_settings_are_refused_where_they_do_not_belong(capsys):
    assert main(["audit", "--classes", "64", "--runs", "1"]) == 2
    assert "--classes is a GAN setting" in capsys.readouterr().err
    with pytest.raises(ValueError, match="classes=1"):
        GANAuditSettings(classes=1)
