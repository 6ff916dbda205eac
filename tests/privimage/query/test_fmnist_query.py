"""The whole query on REAL images: Fashion-MNIST's public half finds the three sensitive classes."""

import os

import pytest
import torch

from privimage.data import FMNIST_ROOT, FMNIST_SENSITIVE_CLASSES, load_dataset
from privimage.query import (ClassifierConfig, SemanticQuery, query_votes, release_histogram, select_subset,
                             train_query_classifier)

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST_ROOT),
                                reason="needs `apt-get install dataset-fashion-mnist` (README command 2 does it)")


def test_fmnist_query_recovers_the_sensitive_classes(tmp_path):
    public = load_dataset("fmnist", split="public", size=3000)
    sensitive = load_dataset("fmnist", split="sensitive", size=600)
    model = train_query_classifier(public, config=ClassifierConfig(width=8, epochs=3, batch_size=32, lr=5e-3),
                                   cache_dir=tmp_path, log=None)
    assert model.public_accuracy > 0.7  # 10 real classes; chance 0.1
    query = SemanticQuery(top_k=1, top_n=3, sigma=0.5)  # epsilon ~10 at delta 1e-5
    result = release_histogram(query_votes(model, sensitive.images, top_k=1), query,  # pooled: one row
                               generator=torch.Generator().manual_seed(0))
    assert set(result.selected) == set(FMNIST_SENSITIVE_CLASSES)
    subset = select_subset(public, result.selected)
    assert set(subset.labels.tolist()) == set(FMNIST_SENSITIVE_CLASSES) and len(subset) > 800
