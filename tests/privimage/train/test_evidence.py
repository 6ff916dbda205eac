"""Evidence that PrivImage's idea works (arXiv 2311.12850), at toy scale on the embedded data.

After the SAME DP fine-tune (same σ, Poisson rate, steps and seeds, hence the same ε), the model pre-trained
on public images of the classes the semantic query selects denoises held-out sensitive images better than
one pre-trained on the same number of random public images, which beats no pre-training. The selected classes
here are the ones a correct query returns (the embedded data's sensitive classes by name): this test measures
the pre-training effect; the query's own accuracy is tested with the query (tests/privimage/query). The loss
is averaged over the quartiles of EDM's training σ distribution (``evidence.EVAL_SIGMAS``, where measurement
shows why) and 200 held-out images with fixed noise; all seeds fixed. Seeds 0-3 all pass, by 0.009-0.017.
"""

from dataclasses import replace

import pytest
import torch

from privimage.data import load_dataset
from privimage.data.embedded import sensitive_classes
from privimage.engine import Mechanism, PrivacyBudget
from privimage.models.unet import PRESETS
from privimage.train.evidence import compare_starting_points


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_selected_subset_beats_random_public_beats_no_pretraining():
    res = 16
    public = load_dataset("embedded", split="public", size=12000, resolution=res)
    sensitive = load_dataset("embedded", split="sensitive", size=400, resolution=res)
    heldout = load_dataset("embedded", split="sensitive_test", size=200, resolution=res)
    unet = replace(PRESETS["tiny"], nf=16, ch_mult=(1, 2), attn_resolutions=(), resolution=res, num_classes=5)
    # One fine-tune plan shared by all three starting points (σ = 1, q = 0.1, 10 steps): the same ε for each.
    budget = PrivacyBudget(100.0, 1e-4, plan={"finetune": Mechanism(1.0, 0.1, STEPS)})
    losses = compare_starting_points(public=public, sensitive=sensitive, heldout=heldout,
                                     selected=sensitive_classes(0), unet=unet, pretrain_steps=PRETRAIN_STEPS,
                                     budget_state=budget.state_dict())
    print(losses)
    assert losses["subset"] < losses["random"] < losses["none"], losses


STEPS, PRETRAIN_STEPS = 10, 300
