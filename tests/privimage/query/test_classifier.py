"""The query classifier separates the embedded classes, is cached, and the DP query on the embedded data
recovers the true sensitive classes at a generous epsilon but not at a tiny one."""

import time
from dataclasses import replace

import pytest
import torch

from privimage.data import embedded, load_dataset
from privimage.query import (ClassifierConfig, QueryClassifier, SemanticQuery, count_votes, query_budget, query_votes,
                             release_histogram, train_query_classifier)
from privimage.engine import compute_epsilon
from privimage.privacy import QUERY

# Small and quick (about 15 s on one CPU core); the defaults (width 32, 5 epochs, batch 128) are for real runs.
CONFIG = ClassifierConfig(width=16, epochs=5, batch_size=32, lr=5e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    public = load_dataset("embedded", split="public", size=4000, seed=0)
    model = train_query_classifier(public, config=CONFIG, cache_dir=cache, log=None)
    return public, model, cache


@pytest.fixture(scope="module")
def sensitive_logits(trained):
    _, model, _ = trained
    sensitive = load_dataset("embedded", split="sensitive", size=1000, seed=0)
    return model.predict_logits(sensitive.images), torch.tensor(embedded.sensitive_classes(0))[sensitive.labels]


def test_embedded_classes_are_separable(trained):
    _, model, _ = trained
    assert model.public_accuracy >= 0.9  # held-out public images, 60 classes (chance: 1/60)


def test_features_and_logits(trained):
    public, model, _ = trained
    x = model.prepare(public.images[:5])
    assert x.shape == (5, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert model.features(x).shape == (5, model.feature_dim) and model(x).shape == (5, 60)
    # Grey and other-resolution inputs are adapted, not refused.
    assert model.prepare(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 3, 32, 32)


def test_cache_by_config_and_data(trained):
    public, model, cache = trained
    assert len(list(cache.glob("classifier-*.pt"))) == 1
    start = time.perf_counter()
    again = train_query_classifier(public, config=CONFIG, cache_dir=cache, log=None)
    assert time.perf_counter() - start < 5
    assert again.public_accuracy == model.public_accuracy
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_cache_key_covers_everything_the_weights_depend_on():
    from privimage.data import ImageDataset
    from privimage.query.classifier import _fingerprint

    public = load_dataset("embedded", split="public", size=64, seed=0)
    key = _fingerprint(public, 32, CONFIG)
    assert _fingerprint(public, 32, CONFIG) == key
    other_data = [
        load_dataset("embedded", split="public", size=64, seed=1),                             # pixels
        ImageDataset(public.images, public.labels.roll(1), public.class_names),                 # labels
        ImageDataset(public.images, public.labels, [n + "'" for n in public.class_names]),      # class names
        ImageDataset(public.images[:, :1].contiguous(), public.labels, public.class_names),     # channels
    ]
    assert all(_fingerprint(d, 32, CONFIG) != key for d in other_data)
    assert _fingerprint(public, 16, CONFIG) != key                                              # resolution
    changed = dict(width=8, blocks=2, epochs=4, batch_size=16, lr=1e-3, weight_decay=0.0, holdout=0.2, seed=1,
                   style_noise=0.1, style_gain=0.2)
    assert all(_fingerprint(public, 32, replace(CONFIG, **{k: v})) != key for k, v in changed.items())
    from dataclasses import fields
    assert set(changed) == {f.name for f in fields(ClassifierConfig)}  # every setting is covered


def test_cache_hit_is_only_a_model_with_the_requested_settings(tmp_path):
    from privimage.query.classifier import _fingerprint

    public = load_dataset("embedded", split="public", size=64, seed=0)
    small = ClassifierConfig(width=4, epochs=1, batch_size=16)
    first = train_query_classifier(public, resolution=16, config=small, cache_dir=tmp_path, log=None)
    (path,) = tmp_path.glob("classifier-*.pt")
    hit = train_query_classifier(public, resolution=16, config=small, cache_dir=tmp_path, log=None)
    assert (hit.width, hit.resolution, hit.channels) == (4, 16, 3) and hit.public_accuracy == first.public_accuracy
    assert all(torch.equal(a, b) for a, b in zip(hit.state_dict().values(), first.state_dict().values()))
    # A file under this key that holds another model (here: width 8) is retrained, not returned.
    wider = replace(small, width=8)
    train_query_classifier(public, resolution=16, config=wider, cache_dir=tmp_path, log=None)
    (tmp_path / f"classifier-{_fingerprint(public, 16, wider)}.pt").replace(path)
    messages = []
    again = train_query_classifier(public, resolution=16, config=small, cache_dir=tmp_path, log=messages.append)
    assert again.width == 4 and any("other settings" in m for m in messages)
    path.write_bytes(b"not a checkpoint")
    messages.clear()
    retrained = train_query_classifier(public, resolution=16, config=small, cache_dir=tmp_path, log=messages.append)
    assert retrained.width == 4
    assert any("unreadable" in m for m in messages)


def test_save_and_load(trained, tmp_path):
    public, model, _ = trained
    model.save(tmp_path / "classifier.pt", public_accuracy=model.public_accuracy)
    loaded = QueryClassifier.load(tmp_path / "classifier.pt")
    assert torch.equal(loaded.predict_logits(public.images[:8]), model.predict_logits(public.images[:8]))


def _recovery(logits, true_classes, *, sigma, top_k, top_n, draws=40):
    """Share of noise draws whose selected top-N contains every true sensitive class."""
    query = SemanticQuery(top_k=top_k, top_n=top_n, sigma=sigma)
    votes = count_votes(logits, top_k=top_k)  # pooled: one row
    gen = torch.Generator().manual_seed(0)
    hits = [set(true_classes) <= set(release_histogram(votes, query, generator=gen).selected) for _ in range(draws)]
    return sum(hits) / draws


# top_k = 1, top_n = 5: the selection IS the 5 true classes. top_k = 2 also votes for each image's runner-up
# (a class sharing colour and texture), which can outrank a true class, so there the top 10 must contain them.
@pytest.mark.parametrize("top_k, top_n", [(1, 5), (2, 10)])
def test_query_recovers_the_sensitive_classes_at_generous_epsilon_only(sensitive_logits, top_k, top_n):
    logits, true_labels = sensitive_logits
    true_classes = embedded.sensitive_classes(0)
    assert (logits.argmax(1) == true_labels).float().mean() > 0.5  # the shifted style is still recognisable
    # One Gaussian release: sigma 0.5 is epsilon ~10, sigma 100 is epsilon ~0.04 (delta 1e-5).
    generous, tiny = 0.5, 100.0
    assert compute_epsilon(noise_multiplier=generous, sample_rate=1.0, steps=1, delta=1e-5).upper > 9
    assert compute_epsilon(noise_multiplier=tiny, sample_rate=1.0, steps=1, delta=1e-5).upper < 0.05
    assert _recovery(logits, true_classes, sigma=generous, top_k=top_k, top_n=top_n) == 1.0
    assert _recovery(logits, true_classes, sigma=tiny, top_k=top_k, top_n=top_n) < 0.2


def test_query_spends_the_budget(trained):
    _, model, _ = trained
    sensitive = load_dataset("embedded", split="sensitive", size=200, seed=0)
    budget = query_budget(epsilon=10.0, delta=1e-5)
    votes = query_votes(model, sensitive.images, sensitive.labels, num_classes=sensitive.num_classes, top_k=1)
    release = release_histogram(votes, SemanticQuery.from_budget(budget, top_k=1, top_n=5),
                                generator=torch.Generator().manual_seed(0), budget=budget)
    assert budget.spent[QUERY] == 1 and len(release.selected) == 5 and release.noisy_histogram.shape == (5, 60)


@pytest.mark.parametrize("bad", [dict(style_noise=-0.1), dict(style_gain=1.0), dict(style_gain=-0.5)])
def test_style_augmentation_settings_are_checked(bad):
    with pytest.raises(ValueError, match="style_noise"):
        ClassifierConfig(**bad)


def test_style_augmentation_changes_training_but_not_inputs_at_evaluation():
    """The augmentation acts on training batches only: same seed, other weights; prediction is unaugmented."""
    public = load_dataset("embedded", split="public", size=96, seed=0, resolution=16)
    small = ClassifierConfig(width=4, epochs=1, batch_size=32)
    plain = train_query_classifier(public, config=small, use_cache=False, log=None)
    styled_config = replace(small, style_noise=0.15, style_gain=0.3)
    styled = train_query_classifier(public, config=styled_config, use_cache=False, log=None)
    again = train_query_classifier(public, config=styled_config, use_cache=False, log=None)
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    assert not torch.equal(weights(plain), weights(styled))
    assert torch.equal(weights(styled), weights(again))  # seeded: the augmentation is reproducible
    assert torch.equal(styled.predict_logits(public.images[:8]), styled.predict_logits(public.images[:8]))


def test_the_old_name_train_classifier_still_works_and_warns():
    from privimage.query import train_classifier

    public = load_dataset("embedded", split="public", size=64, seed=0, resolution=8)
    with pytest.warns(DeprecationWarning, match="train_query_classifier"):
        model = train_classifier(public, config=ClassifierConfig(width=4, epochs=1, batch_size=32), use_cache=False,
                                 log=None)
    assert isinstance(model, QueryClassifier)
