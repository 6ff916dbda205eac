"""The query stage's per-run release: one set of votes, released into several run directories (an ε sweep),
each with its own σ, its own ledger entry written first, and its own relabelled subset."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from privimage.config import CONFIGS
from privimage.data import ImageDataset
from privimage.privacy import QUERY
from privimage.io import save_json
from privimage.query import Votes, query_budget
from privimage.query.stage import release_query


def test_one_set_of_votes_released_into_two_runs(tmp_path):
    public = ImageDataset(torch.arange(24, dtype=torch.uint8).reshape(24, 1, 1, 1).expand(24, 1, 2, 2).contiguous(),
                          torch.arange(24) % 6, [f"p{j}" for j in range(6)])
    votes = Votes(torch.tensor([[0, 0, 40, 0, 0, 0], [0, 0, 0, 0, 35, 0]], dtype=torch.float64), 1)
    # the test config's non-secure test mode seeds the noise, so the two runs are comparable; one class each
    cfg = replace(CONFIGS["test"], query=replace(CONFIGS["test"].query, top_n=2))
    runs = {}
    for epsilon in (1.0, 8.0):
        run = tmp_path / f"eps{epsilon:g}"
        save_json(query_budget(epsilon=epsilon, delta=cfg.delta).state_dict(), run / "budget.json")
        label_map = release_query(run, cfg, votes, public=public, sensitive_class_names=["a", "b"],
                                  log=lambda _: None)
        runs[epsilon] = run
        budget = json.loads((run / "budget.json").read_text())
        selected = json.loads((run / "query" / "selected_labels.json").read_text())
        assert budget["spent"] == {QUERY: 1} and selected["sigma"] == budget["plan"][QUERY]["noise_multiplier"]
        assert label_map == {2: 0, 4: 1}  # a clear signal: both runs select the same classes
        with np.load(run / "query" / "subset.npz") as subset:
            assert subset["labels"].tolist() == [0, 1] * 4  # public images 2, 4, 8, 10, ... in index order
    noisy = {eps: np.load(run / "query" / "histogram.npy") for eps, run in runs.items()}
    for eps, hist in noisy.items():
        assert not np.array_equal(hist, votes.counts.numpy())  # only noisy counts are written
    # the same seeded unit draws, each run its own σ: the noise scales with σ
    sigma = {eps: json.loads((runs[eps] / "query" / "selected_labels.json").read_text())["noise_std"] for eps in runs}
    unit = {eps: (noisy[eps] - votes.counts.numpy()) / sigma[eps] for eps in runs}
    assert sigma[1.0] > sigma[8.0] and np.allclose(unit[1.0], unit[8.0])
    with pytest.raises(ValueError, match="already spent"):  # a run releases once
        release_query(runs[1.0], cfg, votes, public=public, sensitive_class_names=["a", "b"], log=lambda _: None)
