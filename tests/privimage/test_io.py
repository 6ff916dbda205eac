import numpy as np
import pytest
import torch
from PIL import Image

from privimage.io import atomic_write, image_grid, save_png_grid


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half-written")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temporary file left behind


def test_png_grid_round_trips_pixels(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    save_png_grid(images, tmp_path / "g.png", nrow=2)
    png = np.asarray(Image.open(tmp_path / "g.png"))
    assert png.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    # image 3 sits in row 1, column 1
    np.testing.assert_array_equal(png[8:12, 10:16], images[3].permute(1, 2, 0).numpy())


def test_grid_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        image_grid(torch.rand(2, 3, 4, 4))
