"""Rows and samples: the one home of the map from a batch's rows to the samples DP-SGD clips.

A batch has R rows (one per loss value, one per row of every layer's input). A *sample* may span several
rows: noise multiplicity in diffusion (K noise draws of one image, DPDM arXiv 2210.09929) makes a sample's
gradient the SUM of its rows' gradients, and the clipping norm applies to that sum. ``sample_index`` (R,)
long gives each row's sample in [0, S); None means one row per sample. ``is_padding`` (R,) bool marks rows
that count for nothing (Poisson batches padded to a fixed physical size): their values are never read by
the kernels, and a sample with no real row gets clip factor 0 in the engine.

:class:`Grouping` validates both once and derives what the ops and the engine need: per-row → per-sample
sums, per-sample → per-row broadcasts, the sorted-rows index the Triton kernels read (``order``/``offsets``,
built with torch ops only, so no host sync), and, when every sample has the same number k of rows, the
"fold" that turns a sample's rows into extra positions (R, T, ...) → (S, k·T, ...), so batched torch code
can treat samples as rows.

Trap: ``num_samples`` (and hence the validation of ``sample_index``'s range) needs a host sync unless given;
pass ``num_samples`` under ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["Grouping"]


class Grouping:
    """Rows (R) → samples (S), and which rows are padding.

    Args:
        sample_index: (R,) long, each row's sample id in [0, S); None: one sample per row.
        num_rows: R.
        is_padding: (R,) bool or None.
        num_samples: S; default ``max(sample_index) + 1`` (a host sync).
        device: the device of the data (checked against both tensors when given).
        where: the caller, named in error messages (e.g. an op's name).
        name: how the caller calls ``sample_index`` (the engine's argument is ``groups``).
    """

    def __init__(self, sample_index: torch.Tensor | None, num_rows: int, *, is_padding: torch.Tensor | None = None,
                 num_samples: int | None = None, device: torch.device | None = None, where: str = "",
                 name: str = "sample_index"):
        prefix = f"{where}: " if where else ""
        R = num_rows
        if is_padding is not None:
            if tuple(is_padding.shape) != (R,) or is_padding.dtype != torch.bool:
                raise ValueError(f"{prefix}expected is_padding to be a bool tensor of shape ({R},) (True for "
                                 f"padding rows), got {is_padding.dtype} {tuple(is_padding.shape)}.")
            if device is not None and is_padding.device != torch.device(device):
                raise ValueError(f"{prefix}is_padding is on {is_padding.device}, the data on {device}.")
        if sample_index is None:
            if num_samples is not None and num_samples != R:
                raise ValueError(f"{prefix}num_samples={num_samples} given without {name} (one row per sample "
                                 f"means num_samples={R}).")
            num_samples = R
        else:
            if tuple(sample_index.shape) != (R,) or sample_index.dtype != torch.long:
                raise ValueError(f"{prefix}expected {name} to be a LongTensor of shape ({R},) (the sample id of "
                                 f"each row), got {sample_index.dtype} {tuple(sample_index.shape)}.")
            if device is not None and sample_index.device != torch.device(device):
                raise ValueError(f"{prefix}{name} is on {sample_index.device}, the data on {device}.")
            if num_samples is None:
                if R and int(sample_index.min()) < 0:
                    raise ValueError(f"{prefix}expected {name} >= 0 (sample ids), got min {int(sample_index.min())}.")
                num_samples = int(sample_index.max()) + 1 if R else 0
            elif R and not torch.compiler.is_compiling():
                lo, hi = int(sample_index.min()), int(sample_index.max())
                if lo < 0 or hi >= num_samples:
                    raise ValueError(f"{prefix}{name} values must lie in [0, num_samples={num_samples}), got "
                                     f"[{lo}, {hi}].")
        self.sample_index = sample_index
        self.is_padding = is_padding
        self.num_rows = R
        self.num_samples = int(num_samples)

    @classmethod
    def trusted(cls, sample_index, num_rows: int, is_padding, num_samples: int) -> "Grouping":
        """A Grouping of arguments an op's host function already validated (inside a custom op: no syncs)."""
        self = cls.__new__(cls)
        self.sample_index, self.is_padding = sample_index, is_padding
        self.num_rows, self.num_samples = num_rows, int(num_samples)
        return self

    # ---- structure ------------------------------------------------------------------------------------------

    @property
    def trivial(self) -> bool:
        """One row per sample."""
        return self.sample_index is None

    @functools.cached_property
    def counts(self) -> torch.Tensor | None:
        """(S,) rows per sample (padding rows included), or None when trivial."""
        if self.sample_index is None:
            return None
        return torch.bincount(self.sample_index, minlength=self.num_samples)[:self.num_samples]

    @functools.cached_property
    def k(self) -> int:
        """Rows per sample when every sample has the same number (1 when trivial), else 0 (ragged). Host sync."""
        if self.sample_index is None:
            return 1
        counts = self.counts
        if self.num_samples and bool((counts == counts[0]).all()):
            return int(counts[0])
        return 0

    @property
    def uniform(self) -> bool:
        """Every sample has the same number of rows, so :meth:`fold` applies."""
        return self.k > 0

    @functools.cached_property
    def sum_sq_rows(self) -> int:
        """Σ_s (rows of s)²: a ghost norm's cost is T² times this (positions of a sample, squared). Host sync."""
        if self.sample_index is None:
            return self.num_rows
        return int(self.counts.square().sum())

    @functools.cached_property
    def perm(self) -> torch.Tensor | None:
        """Rows sorted by sample (stable), (R,) long; None when trivial."""
        return None if self.sample_index is None else torch.argsort(self.sample_index, stable=True)

    @functools.cached_property
    def block_order(self) -> torch.Tensor | None:
        """For a uniform grouping of k > 1 rows per sample: the row order that makes k blocks of S rows, block j
        holding each sample's j-th row (stable order) in sample order; None when that is the rows' own order
        (e.g. ids [0..S-1, 0..S-1, ...]) or when :meth:`blocks` does not apply. Host sync."""
        if self.k <= 1:
            return None
        order = self.perm.view(self.num_samples, self.k).t().reshape(-1)
        return None if bool((order == torch.arange(self.num_rows, device=order.device)).all()) else order

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(R, ...) → the same rows as k blocks of S (row j·S + s: sample s's j-th row), for uniform groupings
        with k > 1 rows per sample; ``x`` itself (no copy) when the rows already lie so."""
        if self.k <= 1:
            raise ValueError("Grouping.blocks needs every sample to have the same number k > 1 of rows.")
        order = self.block_order
        return x if order is None else x[order]

    def resolve(self) -> "Grouping":
        """Compute every derived index now (host syncs included), so later code, e.g. a compiled region,
        only reads them."""
        if self.sample_index is not None:
            self.k, self.sum_sq_rows, self.perm, self.block_order  # noqa: B018 (cached on first access)
        return self

    def csr(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows sorted by sample (``order`` (R,)) and each sample's slice of them (``offsets`` (S+1,)), int64.

        Torch ops only (no host sync): what the Triton kernels read to visit a sample's rows."""
        R, S = self.num_rows, self.num_samples
        if self.sample_index is None:
            idx = torch.arange(R + 1, device=device)
            return idx[:R], idx
        offsets = torch.zeros(S + 1, dtype=torch.long, device=device)
        torch.cumsum(self.counts, 0, out=offsets[1:])
        return self.perm, offsets

    def padding_flags(self, device) -> torch.Tensor:
        """is_padding as int8 (1 = padding) for the kernels; all zero when None."""
        if self.is_padding is None:
            return torch.zeros(self.num_rows, dtype=torch.int8, device=device)
        return self.is_padding.to(torch.int8)

    def row_index(self, device) -> torch.Tensor:
        """(R,) long: each row's sample id (``arange(R)`` when trivial)."""
        return self.sample_index if self.sample_index is not None else torch.arange(self.num_rows, device=device)

    # ---- moving values between rows and samples ----------------------------------------------------------

    def drop_padding(self, per_row: torch.Tensor) -> torch.Tensor:
        """``per_row`` (R, ...) with padding rows set to exactly 0 (not 0·x: a NaN there does not survive);
        ``per_row`` itself when no row is padding (a host sync: for eager torch code)."""
        if self.is_padding is None or not bool(self.is_padding.any()):
            return per_row
        return torch.where(self.is_padding.view((-1,) + (1,) * (per_row.dim() - 1)), 0, per_row)

    def to_samples(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum a per-row tensor (R, ...) into per-sample values (S, ...); every row counts (see drop_padding)."""
        if self.sample_index is None:
            return per_row
        out = per_row.new_zeros((self.num_samples,) + tuple(per_row.shape[1:]))
        return out.index_add_(0, self.sample_index, per_row)

    def to_rows(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sample tensor (S, ...) back to the rows (R, ...)."""
        return per_sample if self.sample_index is None else per_sample[self.sample_index]

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T, ...) → (S, k·T, ...) for uniform groupings: a sample's rows become extra positions (its
        gradient is the sum of its rows', so a per-sample formula on the folded tensor is the sample's)."""
        if self.sample_index is None:
            return x
        if not self.uniform:
            raise ValueError("Grouping.fold needs every sample to have the same number of rows.")
        x = x[self.perm]
        return x.reshape(self.num_samples, self.k * x.shape[1], *x.shape[2:])
