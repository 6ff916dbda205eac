"""Every reader on small files written here in the publisher's exact format: exact pixels and labels back,
and a named error for each kind of bad input."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from privimage.data import DataError, ImageDataset, load_dataset, load_spec, parse_spec, resize_images

RNG = np.random.default_rng(0)


def _images(n, c=3, s=32):
    return RNG.integers(0, 256, (n, c, s, s), dtype=np.uint8)


# ---- CIFAR ----------------------------------------------------------------------------------------------

def test_cifar10_round_trip(tmp_path, cifar10_writer):
    folder, names, xs, ys = cifar10_writer(tmp_path, RNG)
    for split in ("train", "test"):
        data = load_dataset("cifar10", split=split, root=tmp_path)
        assert data.class_names == names
        assert torch.equal(data.images, torch.from_numpy(xs[split]))
        assert torch.equal(data.labels, torch.from_numpy(ys[split]))
    assert load_dataset("cifar10", split="train", root=folder).resolution == 32


def test_cifar100_round_trip(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}, f)
    x, y = _images(6), [0, 99, 5, 17, 42, 99]
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.reshape(6, -1), "fine_labels": y, "coarse_labels": [0] * 6}, f)
    data = load_dataset("cifar100", split="test", root=tmp_path)
    assert torch.equal(data.images, torch.from_numpy(x)) and data.labels.tolist() == y
    assert data.class_names[99] == "f99"


def test_cifar_errors_name_the_file(tmp_path, cifar10_writer):
    folder, *_ = cifar10_writer(tmp_path, RNG)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"data_batch_3: truncated or corrupt pickle"):
        load_dataset("cifar10", split="train", root=tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=r"test_batch: missing"):
        load_dataset("cifar10", split="test", root=tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}, f)
    with pytest.raises(DataError, match=r"test_batch: wrong shape"):
        load_dataset("cifar10", split="test", root=tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 10], b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(DataError, match=r"test_batch: label 10 out of range \[0, 10\)"):
        load_dataset("cifar10", split="test", root=tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path, cifar10_writer):
    cifar10_writer(tmp_path, RNG)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0], b"data": Evil()}, f)
    with pytest.raises(DataError, match=r"refusing to load builtins.print"):
        load_dataset("cifar10", split="test", root=tmp_path)


# ---- idx ------------------------------------------------------------------------------------------------

def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_round_trip(tmp_path, compressed):
    x, y = RNG.integers(0, 256, (7, 28, 28), dtype=np.uint8), RNG.integers(0, 10, 7).astype(np.uint8)
    for stem, arr in (("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        raw = _idx(arr)
        if compressed:
            (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (tmp_path / stem).write_bytes(raw)
    data = load_dataset("fashion-mnist", split="test", root=tmp_path)
    assert torch.equal(data.images, torch.from_numpy(x).unsqueeze(1))
    assert data.labels.tolist() == y.tolist() and data.class_names[9] == "Ankle boot"
    assert load_dataset("mnist", split="test", root=tmp_path, resolution=32).resolution == 32


def test_idx_errors(tmp_path):
    x = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(x)[:-5])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2, 3], np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong size"):
        load_dataset("mnist", split="train", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(x))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2, 12], np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 12 out of range"):
        load_dataset("mnist", split="train", root=tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2], np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong shape"):
        load_dataset("mnist", split="train", root=tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: truncated or corrupt gzip"):
        load_dataset("mnist", split="train", root=tmp_path)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\(\.gz\): missing"):
        load_dataset("mnist", split="test", root=tmp_path)


# ---- image trees ----------------------------------------------------------------------------------------

def _reference_decode(path, resolution, crop=None):
    """Independent path: PIL decode, centre crop, bicubic resize."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = min(w, h, crop or 10**9)
    l, t = (w - side) // 2, (h - side) // 2
    img = img.crop((l, t, l + side, t + side))
    if resolution and side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_class_folder_round_trip_png_exact(tmp_path):
    expected = {}
    for cls in ("dog", "cat"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            x = _images(1, s=16)[0]
            Image.fromarray(x.transpose(1, 2, 0)).save(tmp_path / cls / f"{i}.png")
            expected[(cls, i)] = torch.from_numpy(x)
    data = load_dataset("folder", split="all", root=tmp_path)
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for k, (cls, i) in enumerate([(c, i) for c in ("cat", "dog") for i in range(3)]):
        assert torch.equal(data.images[k], expected[(cls, i)])


def test_imagenet_tree_and_corrupt_jpeg(tmp_path):
    train = tmp_path / "train"
    paths = []
    for wnid in ("n01440764", "n01443537"):
        (train / wnid).mkdir(parents=True)
        for i in range(2):
            p = train / wnid / f"{wnid}_{i}.JPEG"
            Image.fromarray(_images(1, s=40)[0].transpose(1, 2, 0)[:, :36]).save(p, format="JPEG", quality=90)
            paths.append(p)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    data = load_dataset("imagenet", split="train", root=tmp_path, resolution=16)
    assert data.class_names == ["n01440764 tench, Tinca tinca", "n01443537 goldfish"]
    for k, p in enumerate(paths):
        assert torch.equal(data.images[k], _reference_decode(p, 16))
    bad = train / "n01443537" / "broken.JPEG"
    bad.write_bytes(paths[0].read_bytes()[:200])
    with pytest.raises(DataError, match=r"broken.JPEG: corrupt or unreadable image"):
        load_dataset("imagenet", split="train", root=tmp_path, resolution=16)
    data = load_dataset("imagenet", split="train", root=tmp_path, resolution=16, skip_corrupt=True)
    assert len(data) == 4 and data.num_skipped == 1


def test_celeba_round_trip(tmp_path, celeba_writer):
    files = celeba_writer(tmp_path, RNG)
    data = load_spec(f"celeba:train,root={tmp_path},attribute=Smiling,resolution=32")
    train = [f for f in files if f[2] == 0]
    assert data.class_names == ["not Smiling", "Smiling"]
    assert data.labels.tolist() == [int(v[2] == 1) for _, v, _ in train]
    for k, (name, _, _) in enumerate(train):
        assert torch.equal(data.images[k], _reference_decode(tmp_path / "img_align_celeba" / name, 32, crop=140))
    assert load_dataset("celeba", split="all", root=tmp_path, resolution=64).images.shape == (6, 3, 64, 64)
    with pytest.raises(DataError, match=r"list_attr_celeba.txt: no attribute 'Bald'"):
        load_dataset("celeba", split="train", root=tmp_path, attribute="Bald")
    (tmp_path / "img_align_celeba" / files[0][0]).unlink()
    with pytest.raises(DataError, match=r"000001.jpg: missing"):
        load_dataset("celeba", split="train", root=tmp_path)


def test_imagenet32_npz_round_trip(tmp_path, imagenet_npz_writer):
    # numeric order, not lexicographic: batch 10 comes last
    labels = {f"train_data_batch_{i}": RNG.integers(1, 1001, 3).tolist() for i in (1, 2, 10)}
    written = imagenet_npz_writer(tmp_path, RNG, side=32, labels=labels)
    xs, ys = list(written.values()), [np.asarray(y) - 1 for y in labels.values()]
    (tmp_path / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn02100735 2 English_setter\n")
    data = load_dataset("imagenet32", split="train", root=tmp_path)
    assert torch.equal(data.images, torch.from_numpy(np.concatenate(xs)))
    assert torch.equal(data.labels, torch.from_numpy(np.concatenate(ys)))
    assert data.class_names[0] == "n02119789 kit_fox" and len(data.class_names) == 1000
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=[1, 1001])
    with pytest.raises(DataError, match=r"val_data.npz: label 1000 out of range"):
        load_dataset("imagenet64", split="val", root=tmp_path)
    (tmp_path / "val_data.npz").write_bytes((tmp_path / "train_data_batch_1.npz").read_bytes()[:300])
    with pytest.raises(DataError, match=r"val_data.npz: truncated or corrupt npz"):
        load_dataset("imagenet64", split="val", root=tmp_path)


# ---- dataset type, subsets, specs ------------------------------------------------------------------------

def test_dataset_validates_and_subsets():
    with pytest.raises(ValueError, match="Labels span"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="uint8 images"):
        ImageDataset(torch.zeros(2, 4, 4), torch.tensor([0, 1]), ["a", "b"])
    data = ImageDataset(torch.from_numpy(_images(10)), torch.arange(10) % 2, ["a", "b"])
    sub = data.subset([3, 1])
    assert torch.equal(sub.images[0], data.images[3]) and sub.labels.tolist() == [1, 1]


def test_resize_keeps_constant_and_mean():
    flat = torch.full((1, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(flat, 4), torch.full((1, 3, 4, 4), 77, dtype=torch.uint8))
    x = torch.from_numpy(_images(2, s=16))
    y = resize_images(x, 8)
    assert y.dtype == torch.uint8 and y.shape == (2, 3, 8, 8)
    assert (y.float().mean((2, 3)) - x.float().mean((2, 3))).abs().max() < 8  # a low-pass filter, not a crop
    assert torch.equal(resize_images(x[:, :, :, 2:14], 12), x[:, :, 2:14, 2:14])  # centre crop only


def test_parse_spec():
    assert parse_spec("embedded:public,size=10,seed=3") == {"name": "embedded", "split": "public", "size": 10,
                                                             "seed": 3}
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        parse_spec("embedded,colour=red")
    with pytest.raises(ValueError, match="needs a split"):
        load_spec("embedded")
