"""Evidence that PrivImage's idea works (arXiv 2311.12850), at toy scale on the embedded data.

After the SAME DP fine-tune (same σ, Poisson rate, steps and seeds, hence the same ε), the model pre-trained
on public images of the classes the semantic query selects denoises held-out sensitive images better than
one pre-trained on the same number of random public images, which beats no pre-training. The selected classes
here are the ones a correct query returns (the embedded data's sensitive classes by name): this test measures
the pre-training effect; the query's own accuracy is tested with the query (tests/privimage/query). The loss
is averaged over the quartiles of EDM's training σ distribution (``evidence.EVAL_SIGMAS``) and 200 held-out
images with fixed noise; all seeds fixed. Margins over seeds and per σ: ``bench/results/evidence.md``.
"""

import pytest
import torch

from privimage.train.evidence import compare_starting_points, embedded_setup

STEPS, PRETRAIN_STEPS = 10, 300


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_selected_subset_beats_random_public_beats_no_pretraining():
    losses = compare_starting_points(**embedded_setup(resolution=16, steps=STEPS), pretrain_steps=PRETRAIN_STEPS)
    print(losses)
    assert losses["subset"] < losses["random"] < losses["none"], losses
