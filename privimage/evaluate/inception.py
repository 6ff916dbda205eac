"""The FID Inception-v3 network: the 2015-12-05 TensorFlow graph, as the community ports it to PyTorch.

FID (Heusel et al. 2017, arXiv 1706.08500) is only comparable across papers when every paper uses the same
network: the TensorFlow Inception-v3 graph of 2015-12-05 (``pool_3`` features, 2048-d). pytorch-fid
(github.com/mseitzer/pytorch-fid) ported that graph and its weights to PyTorch as
``pt_inception-2015-12-05-6726825d.pth``; most diffusion/DP papers (DPDM, PrivImage, DPImageBench) report
FIDs from it or from the identical TF graph. torchvision is not a dependency, so the architecture is written
here; the module names are those of ``torchvision.models.Inception3`` (``aux_logits=False``,
``num_classes=1008``) so that the weights file loads key for key.

The FID graph differs from torchvision's ImageNet Inception-v3 in four places, all kept here:
  * the average pools inside the A, C and first E blocks exclude the zero padding from the average
    (TensorFlow's ``avg_pool`` with SAME padding; ``count_include_pad=False``);
  * the second E block (``Mixed_7c``) pools with a *max* pool in its pool branch;
  * the classifier has 1008 outputs (the TF graph's label space), used by the Inception Score;
  * inputs are resized to 299x299 bilinearly (``align_corners=False``) and mapped from [0, 1] to [-1, 1].

Nothing is downloaded: the weights are read from a local file (``--inception-weights`` or the environment
variable ``PRIVIMAGE_INCEPTION_WEIGHTS``). Without that file, callers fall back to the *proxy* FID
(:mod:`privimage.evaluate.features`), always labelled as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV = "PRIVIMAGE_INCEPTION_WEIGHTS"
WEIGHTS_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, the TF graph's) -> ReLU. Keys: ``conv.*``, ``bn.*``.

    BatchNorm here is frozen inference-time normalisation of a pretrained network (eval mode, running
    statistics from the weights file); it never sees private data during training.
    """

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME-padded average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1; outputs 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35->17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2. (Same as torchvision's.)"""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1); outputs 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17->8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2. (Same as torchvision's.)"""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches; outputs 2048 channels.

    ``pool="avg"`` is the first E block of the FID graph (``Mixed_7b``; padding excluded from the average),
    ``pool="max"`` the second (``Mixed_7c``), which in the 2015-12-05 graph max-pools in its pool branch.
    """

    def __init__(self, in_channels: int, *, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"Expected pool='avg' or 'max', got {pool!r}.")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images -> the FID network's input: float32 in [-1, 1], 3 channels, 299x299.

    Accepts uint8 in [0, 255] or float in [0, 1], shape (N, 1|3, H, W). Grey images are repeated to RGB (what
    pytorch-fid's PIL ``convert('RGB')`` does). The resize is pytorch-fid's: bilinear, ``align_corners=False``,
    no antialiasing, on [0, 1] values; then ``2x - 1``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images of shape (N, 1|3, H, W), got {tuple(images.shape)}.")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; :meth:`forward` takes preprocessed input and returns (pool3 features, logits).

    Example:
        >>> net = FIDInceptionV3().eval()
        >>> sorted(net.state_dict())[:2]
        ['Conv2d_1a_3x3.bn.bias', 'Conv2d_1a_3x3.bn.num_batches_tracked']
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 299, 299) in [-1, 1] -> ((N, 2048) pool3 features, (N, 1008) logits)."""
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pool, self.fc(pool)  # dropout sits between them in training only


def find_inception_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The weights file to use: ``path`` if given (it must exist), else ``$PRIVIMAGE_INCEPTION_WEIGHTS``.

    Returns None when neither is set; raises FileNotFoundError naming the path when one is set but missing,
    so a typo never silently turns a real FID into a proxy FID.
    """
    source = "--inception-weights"
    if path is None:
        path, source = os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}"
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} (from {source}) does not exist. Point it at "
                                f"a local copy of {WEIGHTS_FILE_NAME}, or unset it to use the proxy FID.")
    return path


def load_fid_inception(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID Inception and load ``pt_inception-2015-12-05-6726825d.pth`` (or a same-keyed file).

    Raises:
        ValueError: the file is not a state dict of this architecture (names the file and the key mismatch).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"Cannot read Inception weights {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights {path} hold a {type(state).__name__}, not a state dict.")
    net = FIDInceptionV3()
    expected = net.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"Inception weights {path}: {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)}.")
    # Files written by old torch versions have no BatchNorm ``num_batches_tracked`` (a training counter that
    # inference never reads); every other key must match exactly.
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"Inception weights {path} do not match the FID Inception-v3: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)}).")
    return net.to(device).eval().requires_grad_(False)
