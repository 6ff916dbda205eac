"""Classification accuracy (CA): train a classifier on synthetic images and labels, test it on real images.

Two protocols:

* **official** (PrivImage, arXiv 2311.12850, and DPDM, arXiv 2210.09929): one ResNet-9 (Page 2018, "How to
  train your ResNet", the DAWNBench CIFAR-10 network), SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine
  schedule, 50 epochs, batch 512, random horizontal flips; the accuracy after the last epoch on the real
  test set. :data:`OFFICIAL` is that recipe; :data:`SMALL` is a few-epoch CNN for CPU demos and tests.
* **dpimagebench** (Gong et al., DPImageBench, arXiv 2503.14681): several classifiers; for each, the epoch
  is *selected on a noisy validation split of the sensitive data* and its test accuracy reported; the
  result is the mean and standard deviation over classifiers. Selection is Report Noisy Max with Laplace
  noise of scale 1/epsilon_sel on the number of correct validation predictions of each epoch (a counting
  query of sensitivity 1, monotone), which is epsilon_sel-DP per classifier (Dwork & Roth 2014, Claim 3.9);
  it spends privacy *in addition to* the training budget. ``selection_epsilon`` has no default, so no caller
  spends it without naming it; :mod:`privimage.evaluate.report` enters it in the run's evaluation ledger and
  adds it to the total ε it reports.

Selecting the epoch (or the classifier) on the real test set reports the best of many test accuracies: it
both overestimates utility and is not DP (DPImageBench, Sec. 5). It is not offered.

The classifiers use BatchNorm: they train on synthetic data only (post-processing of a DP release), never
on the private path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privimage.progress import progress_bar


# -------------------------------------------------------------------------------------------------------------
# Classifiers


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (Page 2018): prep 64 -> [128, pool, res] -> [256, pool] -> [512, pool, res] -> max -> fc.

    ``width`` scales every layer (64 is the published network); inputs of any size >= 8 work (the final
    pool is global). Output logits are scaled by 0.125 as in the original, which keeps the initial loss sane
    at lr 0.1.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 64) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x)) * 0.125


class _WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride=stride,
                                                                                 bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016, arXiv 1605.07146)."""

    def __init__(self, in_channels: int, num_classes: int, *, depth: int = 16, widen: int = 4) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Expected WRN depth = 6n + 4, got depth={depth}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        for stage in range(3):
            for i in range(n):
                layers.append(_WideBlock(widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1],
                                         stride=(1 if stage == 0 or i > 0 else 2)))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[3], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool stages and a linear head: small enough to train on a CPU (the ``small`` preset)."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _conv_bn(in_channels, width), nn.MaxPool2d(2),
            _conv_bn(width, 2 * width), nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x))


ARCHITECTURES = ("resnet9", "wrn", "cnn")  # each has .features(x) -> (N, D), so any can serve as a proxy net


def build_classifier(arch: str, in_channels: int, num_classes: int, *, width: int | None = None) -> nn.Module:
    if arch == "resnet9":
        return ResNet9(in_channels, num_classes, width=width or 64)
    if arch == "wrn":
        return WideResNet(in_channels, num_classes, widen=max(1, (width or 64) // 16))
    if arch == "cnn":
        return SmallCNN(in_channels, num_classes, width=width or 32)
    raise ValueError(f"Unknown classifier architecture {arch!r}; choose one of {ARCHITECTURES}.")


# -------------------------------------------------------------------------------------------------------------
# Training recipe


@dataclass(frozen=True)
class CAConfig:
    """How the synthetic-data classifier is trained (the defaults are the official recipe)."""

    arch: str = "resnet9"        # one of ARCHITECTURES
    width: int | None = None     # None: the architecture's published width
    epochs: int = 50
    batch_size: int = 512
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"     # "cosine" (per step, to 0) or "constant"
    flips: bool = True           # random horizontal flips of the training images
    eval_batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"Expected arch in {ARCHITECTURES}, got {self.arch!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected {name}={getattr(self, name)} >= 1.")
        if not self.lr > 0:
            raise ValueError(f"Expected lr={self.lr} > 0.")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"Expected schedule 'cosine' or 'constant', got {self.schedule!r}.")


OFFICIAL = CAConfig()
SMALL = CAConfig(arch="cnn", width=32, epochs=5, batch_size=128, lr=0.05)
PRESETS = {"official": OFFICIAL, "small": SMALL}


def _to_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _check_labelled(images, labels, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"Expected {what} images as uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"Expected {images.shape[0]} {what} labels, got shape {tuple(labels.shape)}.")
    return images, labels


@torch.no_grad()
def count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1024,
                  device: str | torch.device = "cpu") -> int:
    """Number of ``images`` whose predicted class equals ``labels``."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = _to_input(images[start:start + batch_size].to(device))
        correct += int((model(x).argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct


def train_ca_classifier(images, labels, *, num_classes: int, config: CAConfig = OFFICIAL,
                        device: str | torch.device = "cpu", on_epoch=None, desc: str = "CA train") -> nn.Module:
    """Train ``config.arch`` on uint8 ``images`` with ``labels``; ``on_epoch(epoch, model)`` after each epoch."""
    images, labels = _check_labelled(images, labels, "training")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Training labels must be in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}].")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # weight init
    model = build_classifier(config.arch, images.shape[1], num_classes, width=config.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    n = images.shape[0]
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    total = config.epochs * steps_per_epoch
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if config.schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    bar = progress_bar(total, desc=f"{desc} {config.arch}", unit="step")
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            if idx.numel() < 2:  # a single-image batch breaks BatchNorm's training statistics
                continue
            x = _to_input(images[idx].to(device))
            if config.flips:
                flip = torch.rand(idx.numel(), generator=gen) < 0.5
                x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(epoch=epoch + 1, loss=loss.item(), refresh=False)
            bar.update()
        if on_epoch is not None:
            on_epoch(epoch, model)
    bar.close()
    return model.eval()


def classification_accuracy(train_images, train_labels, test_images, test_labels, *, num_classes: int,
                            config: CAConfig = OFFICIAL, device: str | torch.device = "cpu") -> dict:
    """The official CA: train on (synthetic) images, accuracy in [0, 1] on the real test set after the last
    epoch. Returns a dict for the report."""
    test_images, test_labels = _check_labelled(test_images, test_labels, "test")
    model = train_ca_classifier(train_images, train_labels, num_classes=num_classes, config=config, device=device)
    correct = count_correct(model, test_images, test_labels, batch_size=config.eval_batch_size, device=device)
    return {"protocol": "official", "accuracy": correct / max(1, test_images.shape[0]),
            "num_train": int(torch.as_tensor(train_labels).numel()), "num_test": int(test_images.shape[0]),
            "config": asdict(config)}


def _laplace(scale: float, generator: torch.Generator) -> float:
    # Inverse CDF of Laplace(0, scale) from one uniform draw in (-1/2, 1/2).
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) - 0.5
    return -scale * math.copysign(1.0, u) * math.log1p(-2 * abs(u))


def dpimagebench_accuracy(train_images, train_labels, val_images, val_labels, test_images, test_labels, *,
                          num_classes: int, archs: tuple[str, ...] = ("resnet9", "wrn", "cnn"),
                          selection_epsilon: float, config: CAConfig = OFFICIAL,
                          generator: torch.Generator | None = None,
                          device: str | torch.device = "cpu") -> dict:
    """DPImageBench's CA: per classifier, pick the epoch by Report Noisy Max on the sensitive validation
    split; report the selected epochs' test accuracies, their mean and (population) std.

    Guarantees:
        The validation data are touched only through the argmax over epochs of (correct count + Laplace(
        1/selection_epsilon)): selection_epsilon-DP per classifier, len(archs) * selection_epsilon in all
        (basic composition), on top of whatever produced the synthetic data. Test accuracies of unselected
        epochs and the noisy counts are never reported. The validation and test sets must be disjoint, or the
        selection picks epochs by their test accuracy (the caller's duty; the report checks it).

    Args:
        selection_epsilon: ε of the noisy selection per classifier (pure ε-DP, δ = 0); required, because it
            is privacy spent on the sensitive data on top of the training budget.
        generator: source of the Laplace noise; default ``privimage.engine.secure_generator()`` (OS-seeded);
            a fixed seed only in tests.
    """
    if not selection_epsilon > 0:
        raise ValueError(f"Expected selection_epsilon={selection_epsilon} > 0.")
    val_images, val_labels = _check_labelled(val_images, val_labels, "validation")
    test_images, test_labels = _check_labelled(test_images, test_labels, "test")
    if generator is None:
        from privimage.engine import secure_generator

        generator = secure_generator()
    per_arch = []
    for arch in archs:
        best = {"noisy_correct": -math.inf}
        cfg = replace(config, arch=arch, width=config.width if arch == config.arch else None)

        def on_epoch(epoch: int, model: nn.Module, best=best) -> None:
            correct = count_correct(model, val_images, val_labels, batch_size=cfg.eval_batch_size, device=device)
            noisy = correct + _laplace(1.0 / selection_epsilon, generator)
            if noisy >= best["noisy_correct"]:
                test_correct = count_correct(model, test_images, test_labels, batch_size=cfg.eval_batch_size,
                                             device=device)
                best.update(noisy_correct=noisy, epoch=epoch + 1, test_accuracy=test_correct / test_images.shape[0])
            model.train()

        train_ca_classifier(train_images, train_labels, num_classes=num_classes, config=cfg, device=device,
                            on_epoch=on_epoch, desc=f"CA (DPImageBench) {arch}")
        per_arch.append({"arch": arch, "selected_epoch": best["epoch"], "accuracy": best["test_accuracy"]})
    accs = np.array([a["accuracy"] for a in per_arch])
    return {"protocol": "dpimagebench", "accuracy": float(accs.mean()), "std": float(accs.std()),
            "per_classifier": per_arch, "selection_epsilon_per_classifier": selection_epsilon,
            "selection_epsilon_total": selection_epsilon * len(archs), "selection_delta": 0.0,
            "num_train": int(torch.as_tensor(train_labels).numel()), "num_val": int(val_images.shape[0]),
            "num_test": int(test_images.shape[0]), "config": asdict(config)}
