"""What ``privimage evaluate`` computes and from where: :class:`EvaluateOptions` (one field per flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

import privimage.evaluate.classify as classify

__all__ = ["EvaluateOptions"]


@dataclass
class EvaluateOptions:
    """What to compute and from where (the ``privimage evaluate`` flags)."""

    inception_weights: str | None = None     # None: $PRIVIMAGE_INCEPTION_WEIGHTS, else the proxy FID
    reference_stats: str | None = None       # precomputed Inception mu/sigma .npz (skips the real features)
    real: str | None = None                  # .npz test set overriding load_real(split="sensitive_test");
                                             # also the FID reference unless fid_real is given
    fid_real: str | None = None              # .npz FID reference images
    val: str | None = None                   # .npz validation set for the DPImageBench protocol
    fid_split: str = "sensitive"             # real split the FID reference statistics come from
    num_samples: int | None = None           # generated images used (None: all; official 5k, community 50k)
    num_reference: int | None = None         # real images for the reference statistics (None: all)
    pr_k: int = 3                            # k of the k-NN precision/recall
    pr_max: int = 5000                       # at most this many images per side for precision/recall
    is_splits: int = 10
    ca_protocol: str = "official"            # "official", "dpimagebench" or "none"
    ca: classify.CAConfig = field(default_factory=lambda: classify.OFFICIAL)
    ca_archs: tuple[str, ...] = ("resnet9", "wrn", "cnn")
    selection_epsilon: float | None = None   # ε of DPImageBench's noisy selection per classifier, spent on the
                                             # sensitive validation data: required with that protocol
    val_size: int = 1000
    batch_size: int = 200
    device: str = "cpu"
    bf16: bool = False
    cache_dir: str | None = None             # where reference statistics of real images are cached (None: the
                                             # run's private/fid; they are statistics of sensitive data)
    grid_per_class: int = 8
    max_grid_classes: int = 10

    def __post_init__(self) -> None:
        if self.ca_protocol not in ("official", "dpimagebench", "none"):
            raise ValueError(f"Unknown CA protocol {self.ca_protocol!r}; use official, dpimagebench or none.")
        if self.ca_protocol == "dpimagebench":
            if self.selection_epsilon is None:
                raise ValueError("The dpimagebench CA protocol selects epochs on sensitive validation data and "
                                 "spends privacy on top of the training budget: give its epsilon per classifier "
                                 f"explicitly (--selection-epsilon; {len(self.ca_archs)} classifiers spend "
                                 f"{len(self.ca_archs)} x that).")
            if not self.selection_epsilon > 0:
                raise ValueError(f"Expected selection_epsilon={self.selection_epsilon} > 0.")

    @property
    def selection_epsilon_total(self) -> float:
        """ε the evaluation spends on sensitive data: 0 unless the DPImageBench protocol is chosen."""
        if self.ca_protocol != "dpimagebench":
            return 0.0
        return self.selection_epsilon * len(self.ca_archs)
