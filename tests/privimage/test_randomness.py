"""Per-record secret draws (privimage.randomness): Philox4x32-10 against Random123's known answers and a
plain-integer reference, draws that belong to one record whatever the batch, its order or the chunking,
distributions, keys and state that never show in a repr."""

import doctest

import numpy as np
import pytest
import torch
from scipy import stats

import privimage.randomness as randomness
from privimage.randomness import RecordRandomness, philox4x32

# Random123's kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_reference(counter, key, rounds=10):
    """Philox4x32 in Python integers (arbitrary precision), key bumped before rounds 2..R as in Random123."""
    m = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r > 0:
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & m, p1 & m, ((p0 >> 32) ^ c3 ^ k1) & m, p0 & m
    return c0, c1, c2, c3


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_known_answers(counter, key, expected):
    out = philox4x32(torch.tensor(counter, dtype=torch.int64), key)
    assert tuple(int(v) for v in out) == expected
    assert philox_reference(counter, key) == expected


def test_vectorised_matches_the_integer_reference():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2 ** 32, (64, 4), dtype=np.uint64).astype(np.int64)
    counters[:4] = [[2 ** 32 - 1] * 4, [0] * 4, [2 ** 31] * 4, [1, 2, 3, 4]]  # the extremes of the product split
    key = (int(rng.integers(0, 2 ** 32)), 2 ** 32 - 1)
    out = philox4x32(torch.from_numpy(counters), key)
    for row, got in zip(counters.tolist(), out.tolist()):
        assert tuple(got) == philox_reference(row, key)


def test_a_records_draws_do_not_depend_on_the_other_records_in_the_call():
    draws = RecordRandomness.from_public_seed(7)
    full = draws.normal(stream=1, step=5, indices=torch.arange(10), n=13)
    perm = torch.tensor([9, 0, 4, 4, 2])
    assert torch.equal(draws.normal(stream=1, step=5, indices=perm, n=13), full[perm])
    assert torch.equal(draws.normal(stream=1, step=5, indices=torch.tensor([3]), n=13)[0], full[3])
    assert torch.equal(draws.normal(stream=1, step=5, indices=torch.arange(10), n=5), full[:, :5])
    assert draws.normal(stream=1, step=5, indices=torch.tensor([], dtype=torch.long), n=3).shape == (0, 3)
    assert draws.normal(stream=1, step=5, indices=torch.arange(3), n=0).shape == (3, 0)


@pytest.mark.parametrize("chunk_words", [4, 8, 20, 64])
@pytest.mark.parametrize("method", ["words", "uniform", "normal"])
def test_draws_do_not_depend_on_the_chunking(monkeypatch, chunk_words, method):
    """Chunks of 1 to 16 blocks cut records (n=7: 2 blocks each, odd, so a Box–Muller pair is cut at the end)
    and blocks within a record (n=150): every record gets the draws of the unchunked call, alone or not."""
    draws = RecordRandomness.from_public_seed(4)
    idx = torch.tensor([31, 0, 2 ** 32 - 1, 7, 31, 12, 5, 99, 3])
    draw = getattr(draws, method)
    whole = {n: draw(stream=2, step=8, indices=idx, n=n) for n in (7, 150)}
    monkeypatch.setitem(randomness.CHUNK_WORDS, "cpu", chunk_words)
    for n, expected in whole.items():
        assert torch.equal(draw(stream=2, step=8, indices=idx, n=n), expected)
        assert torch.equal(draw(stream=2, step=8, indices=idx[[5, 2]], n=n), expected[[5, 2]])


def test_a_call_never_computes_more_than_a_chunk_of_words_at_once(monkeypatch):
    """The memory bound's mechanism: every Philox lane of a call holds at most CHUNK_WORDS / 4 words."""
    largest = []
    real = randomness._philox_lanes

    def spy(*lanes_and_key):
        out = real(*lanes_and_key)
        largest.append(max(lane.numel() for lane in out))
        return out

    monkeypatch.setattr(randomness, "_philox_lanes", spy)
    monkeypatch.setitem(randomness.CHUNK_WORDS, "cpu", 64)
    draws = RecordRandomness.from_public_seed(0)
    draws.normal(stream=0, step=0, indices=torch.arange(3), n=1000)      # blocks of a record split
    draws.normal(stream=0, step=0, indices=torch.arange(100), n=10)      # records grouped
    assert largest and max(largest) <= 64 // 4 and len(largest) > 10


def test_keys_steps_streams_and_records_give_different_draws():
    a, b = RecordRandomness.from_public_seed(0), RecordRandomness.from_public_seed(1)
    idx = torch.arange(4)
    base = a.words(stream=1, step=0, indices=idx, n=4)
    for other in (b.words(stream=1, step=0, indices=idx, n=4), a.words(stream=2, step=0, indices=idx, n=4),
                  a.words(stream=1, step=1, indices=idx, n=4)):
        assert not torch.equal(base, other)
    assert len({tuple(r) for r in base.tolist()}) == 4


def test_distributions():
    draws = RecordRandomness.from_public_seed(3)
    idx = torch.arange(2000)
    z = draws.normal(stream=1, step=0, indices=idx, n=10).double().flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert stats.kstest(z / 1.1, "norm").pvalue < 1e-6
    u = draws.uniform(stream=2, step=0, indices=idx, n=5).flatten().numpy()
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    assert stats.kstest(u ** 1.1, "uniform").pvalue < 1e-6
    k = draws.integers(stream=3, step=0, indices=torch.arange(30000), high=7)
    counts = torch.bincount(k, minlength=7).numpy()
    assert k.min() >= 0 and k.max() < 7 and stats.chisquare(counts).pvalue > 1e-3


def test_secret_keys_state_and_public_seeds():
    a, b = RecordRandomness.secret(), RecordRandomness.secret()
    assert a.secure and a.state_dict()["key"] != b.state_dict()["key"]
    restored = RecordRandomness.from_state_dict(a.state_dict())
    idx = torch.arange(3)
    assert restored.secure and torch.equal(restored.words(stream=0, step=9, indices=idx, n=6),
                                           a.words(stream=0, step=9, indices=idx, n=6))
    public = RecordRandomness.from_public_seed(5)
    assert not public.secure and public.state_dict() == RecordRandomness.from_public_seed(5).state_dict()


def test_the_repr_and_errors_never_show_the_key():
    draws = RecordRandomness.secret()
    key = draws.state_dict()["key"]
    text = f"{draws!r} {draws} {[draws]}"
    assert repr(draws) == "RecordRandomness(secure=True)"
    assert not any(encoded in text for encoded in (str(key), f"{key:x}", f"{key:X}"))
    with pytest.raises(ValueError) as bad:
        RecordRandomness(2 ** 64 + key, secure=True)
    assert str(2 ** 64 + key) not in str(bad.value) and f"{key:x}" not in str(bad.value)


def test_bad_arguments_are_named():
    draws = RecordRandomness.from_public_seed(0)
    with pytest.raises(ValueError, match="step=-1"):
        draws.words(stream=0, step=-1, indices=torch.arange(2), n=1)
    with pytest.raises(ValueError, match="indices"):
        draws.words(stream=0, step=0, indices=torch.tensor([-1]), n=1)
    with pytest.raises(ValueError, match="high=0"):
        draws.integers(stream=0, step=0, indices=torch.arange(2), high=0)
    with pytest.raises(ValueError, match="n=-1"):
        draws.normal(stream=0, step=0, indices=torch.arange(2), n=-1)
    with pytest.raises(ValueError, match="key"):
        RecordRandomness(2 ** 64, secure=False)
    with pytest.raises(ValueError, match="key .* got a str"):
        RecordRandomness.from_state_dict({"key": "ab" * 32, "secure": True})  # the old hex-string format


def test_docstring_example():
    result = doctest.testmod(randomness, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
