"""PrivImage's claim for the GAN (arXiv 2311.12850, PRIVIMAGE+G), at toy scale on the embedded data.

After the SAME DP fine-tune (same σ, Poisson rate, discriminator steps and seeds, hence the same ε), the
generator pre-trained on public images of the classes the semantic query selects beats the one pre-trained
on as many random public images and the one not pre-trained, on both proxy FID (lower) and CA (higher)
against held-out sensitive images. The selected classes are the ones a correct query returns (the embedded
data's sensitive classes by name); the query's own accuracy is tested with the query. The measured version
(bigger generator, more steps, 3 seeds, spread): bench/gan_evidence.py -> bench/results/gan_evidence.md.
"""

from dataclasses import replace

import pytest

from privimage.data import load_dataset
from privimage.data.embedded import sensitive_classes
from privimage.engine import Mechanism, PrivacyBudget
from privimage.evaluate import SMALL, proxy_feature_net
from privimage.models import GAN_PRESETS
from privimage.query import ClassifierConfig, train_classifier
from privimage.train.gan_evidence import compare_gan_starting_points

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_selected_subset_beats_random_public_and_no_pretraining(tmp_path):
    res = 16
    public = load_dataset("embedded", split="public", size=6000, resolution=res)
    sensitive = load_dataset("embedded", split="sensitive", size=400, resolution=res)
    heldout = load_dataset("embedded", split="sensitive_test", size=300, resolution=res)
    classifier = train_classifier(public, config=ClassifierConfig(width=8, epochs=3, style_noise=0.15,
                                                                  style_gain=0.3), cache_dir=tmp_path, log=None)
    gan = replace(GAN_PRESETS["demo"], g_width=4, d_width=8, num_classes=5)
    # One fine-tune plan for all three starting points (σ = 1, q = 0.1, 10 discriminator steps): the same ε.
    budget = PrivacyBudget(100.0, 1e-4, plan={"finetune": Mechanism(1.0, 0.1, 10)})
    results = compare_gan_starting_points(
        public=public, sensitive=sensitive, heldout=heldout, selected=sensitive_classes(0), gan=gan,
        budget_state=budget.state_dict(), features=proxy_feature_net(classifier), pretrain_steps=200,
        pretrain=dict(batch_size=32, d_lr=2e-3, g_lr=2e-3, betas=(0.5, 0.999), d_steps_per_g_step=1, ema_decay=0.9),
        finetune=dict(physical_batch_size=64, d_lr=2e-4, g_lr=2e-4, betas=(0.5, 0.999), d_steps_per_g_step=2,
                      ema_decay=0.9),
        num_samples=300, ca=SMALL, seed=0)
    print(results)
    fid = {name: r["proxy_fid"] for name, r in results.items()}
    ca = {name: r["ca"] for name, r in results.items()}
    assert fid["subset"] < min(fid["random"], fid["none"]), results
    assert ca["subset"] > max(ca["random"], ca["none"]), results
