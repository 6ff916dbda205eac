"""Streaming the subset: the FFCV file and the device-resident loader yield exactly the reader's images."""

import os

import pytest
import torch

from privimage.data import load_dataset
from privimage.query import DeviceLoader, FFCVLoader, augment, ffcv_available, make_loader, write_ffcv

needs_ffcv = pytest.mark.skipif(not ffcv_available(), reason="FFCV not installed (pip install -e '.[ffcv]')")


@pytest.fixture(scope="module")
def data():
    return load_dataset("embedded", split="public", size=300, seed=2)


@pytest.fixture(scope="module")
def ffcv_file(tmp_path_factory, data):
    if not ffcv_available():
        pytest.skip("FFCV not installed")
    return write_ffcv(data, tmp_path_factory.mktemp("ffcv") / "subset.ffcv")


def _epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_device_loader_in_order_is_the_data(data):
    x, y = _epoch(DeviceLoader(data, batch_size=64, shuffle=False, flip=False, normalize=False))
    assert torch.equal(x, data.images) and torch.equal(y, data.labels)


def test_device_loader_rows_not_a_multiple_of_8_bytes():
    from privimage.data import ImageDataset

    odd = ImageDataset(torch.randint(0, 256, (10, 1, 5, 5), dtype=torch.uint8), torch.arange(10) % 3, list("abc"))
    x, y = _epoch(DeviceLoader(odd, batch_size=4, shuffle=False, flip=False, normalize=False))
    assert torch.equal(x, odd.images) and torch.equal(y, odd.labels)


def test_device_loader_shuffles_each_epoch_and_drops_last(data):
    loader = DeviceLoader(data, batch_size=64, seed=3, flip=False, normalize=False, drop_last=True)
    assert len(loader) == 300 // 64
    (x1, y1), (x2, y2) = _epoch(loader), _epoch(loader)
    assert x1.shape[0] == 64 * 4 and not torch.equal(y1, y2)
    # Every streamed image is one of the data set's, with its own label.
    index = {bytes(img.numpy().tobytes()): int(lab) for img, lab in zip(data.images, data.labels)}
    assert all(index[bytes(img.numpy().tobytes())] == int(lab) for img, lab in zip(x1, y1))
    assert _epoch(DeviceLoader(data, batch_size=64, seed=3, flip=False, normalize=False, drop_last=True))[1].equal(y1)


def test_augment_flips_about_half_and_normalises():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    out = augment(images, flip=True, normalize=True, generator=torch.Generator().manual_seed(0))
    ref = images.float() / 127.5 - 1
    same, flipped = (out == ref).flatten(1).all(1), (out == ref.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 150 < int(flipped.sum()) < 250
    assert out.min() >= -1 and out.max() <= 1


@needs_ffcv
def test_ffcv_file_round_trips_exactly(data, ffcv_file):
    x, y = _epoch(FFCVLoader(ffcv_file, batch_size=64, shuffle=False, flip=False, normalize=False, num_workers=1))
    assert torch.equal(x, data.images) and torch.equal(y, data.labels)


@needs_ffcv
def test_ffcv_and_device_loaders_agree_after_normalisation(data, ffcv_file):
    kwargs = dict(batch_size=50, shuffle=False, flip=False)
    xf, yf = _epoch(FFCVLoader(ffcv_file, num_workers=1, **kwargs))
    xd, yd = _epoch(DeviceLoader(data, **kwargs))
    assert xf.dtype == torch.float32 and torch.equal(xf, xd) and torch.equal(yf, yd)


@needs_ffcv
def test_ffcv_random_order_is_a_permutation(data, ffcv_file):
    loader = FFCVLoader(ffcv_file, batch_size=64, seed=5, flip=True, normalize=False, num_workers=1)
    x, y = _epoch(loader)
    assert len(loader) == 5 and not torch.equal(y, data.labels)
    assert torch.equal(y.sort().values, data.labels.sort().values)
    originals = {bytes(img.numpy().tobytes()) for img in data.images}
    assert all(bytes(img.numpy().tobytes()) in originals or bytes(img.flip(-1).numpy().tobytes()) in originals
               for img in x)


@needs_ffcv
def test_write_is_atomic(tmp_path, data, monkeypatch):
    import ffcv.writer

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_ffcv(data, tmp_path / "subset.ffcv")
    assert os.listdir(tmp_path) == []


def test_make_loader_picks_the_device_loader_on_cpu(data, tmp_path):
    assert isinstance(make_loader(data, batch_size=8), DeviceLoader)
    with pytest.raises(ValueError, match="ffcv_path"):
        make_loader(data, batch_size=8, kind="ffcv")


@needs_ffcv
def test_ffcv_leaves_torch_threads_alone(ffcv_file):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = FFCVLoader(ffcv_file, batch_size=64, num_workers=1)
        assert torch.get_num_threads() == 2
        for _ in loader:
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["device", "ffcv"])
def test_epoch_resumes_mid_epoch_with_the_same_batches(data, tmp_path_factory, kind):
    if kind == "ffcv" and not ffcv_available():
        pytest.skip("FFCV not installed")
    path = tmp_path_factory.mktemp("resume") / "subset.ffcv"

    def fresh():  # a new loader, as a resumed process would build it
        if kind == "device":
            return DeviceLoader(data, batch_size=64, seed=7, drop_last=True)
        return FFCVLoader(path if path.is_file() else write_ffcv(data, path), batch_size=64, seed=7,
                          drop_last=True, num_workers=1)

    full = list(fresh().epoch(2))
    resumed = list(fresh().epoch(2, start=3))
    assert len(full) == 4 and len(resumed) == 1
    assert torch.equal(resumed[0][0], full[3][0]) and torch.equal(resumed[0][1], full[3][1])
    assert not torch.equal(full[0][1], next(fresh().epoch(1))[1])  # epochs differ
    assert list(fresh().epoch(0, start=4)) == []
    with pytest.raises(ValueError, match="start=5"):
        next(fresh().epoch(0, start=5))


def test_iterating_is_epoch_0_then_1(data):
    loader = DeviceLoader(data, batch_size=100, seed=1)
    (x0, y0), (x1, y1) = _epoch(loader), _epoch(loader)
    (r0, l0), (r1, l1) = _epoch(loader.epoch(0)), _epoch(loader.epoch(1))
    assert torch.equal(x0, r0) and torch.equal(y0, l0) and torch.equal(x1, r1) and torch.equal(y1, l1)


@needs_ffcv
def test_ffcv_and_device_loaders_stream_the_same_shuffled_flipped_epochs_on_cpu(data, ffcv_file):
    kwargs = dict(batch_size=64, seed=4, drop_last=True)
    xf, yf = _epoch(FFCVLoader(ffcv_file, num_workers=1, **kwargs).epoch(3))
    xd, yd = _epoch(DeviceLoader(data, **kwargs).epoch(3))
    assert torch.equal(xf, xd) and torch.equal(yf, yd) and not torch.equal(yd, data.labels[:256])
