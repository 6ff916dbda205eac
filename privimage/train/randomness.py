"""The secret, per-record source of the DP fine-tune's diffusion randomness.

Every random draw that touches a sensitive record's loss (its noise levels σ, its noise images, its label
dropout) is part of the mechanism, so it must be (1) secret and (2) attached to the record, not to its slot
in a batch (DESIGN.md "Privacy boundaries").

(1) Secret: the DP proof conditions on nothing the adversary knows. If the draws came from the public config
seed, an adversary who knows the config can regenerate them, and the sensitivity of the clipped sum has to
be analysed conditional on them, which (2) then breaks.

(2) Per record: the engine clips each record's gradient to C, so adding one record moves the clipped sum by
at most C *provided every other record's gradient stays the same*. With draws handed out by position in a
micro-batch, inserting a record shifts the draws of every record behind it: their gradients change and the
sum moves by several C (issue 13). Keyed by (key, step, record index), the other records keep their draws
and the sum moves by at most C.

Contract: record ``i`` (its index in the sensitive data set, never its position in a batch) at step ``t``
draws from a torch generator seeded with ``BLAKE2b(key; t, i)`` (a keyed PRF, 64-bit output). The key is
256 bits from the OS (:mod:`secrets`) at a fresh start and is stored only in the private checkpoint, so a
resumed run redraws exactly what the uninterrupted one drew. ``insecure_from_seed`` derives the key from the
public seed instead: reproducible for tests, and NOT private (anyone with the config can replay the draws).

Trap (cost): this is a Python loop over the records of every micro-batch: one keyed hash, one generator and
up to three small draws per record per step (on CUDA, three small kernel launches per record). Keep it off
the per-row path: draw all K rows of a record at once (:meth:`privimage.diffusion.EDMLoss.draw_per_record`
does), never one generator per row.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Iterable, Iterator

import torch

__all__ = ["PerRecordRandomness"]

_KEY_BYTES = 32


class PerRecordRandomness:
    """Generators keyed by (secret key, step, record index); see the module docstring for the contract.

    Example:
        >>> r = PerRecordRandomness.insecure_from_seed(0)
        >>> a = torch.randn(2, generator=r.generator(step=3, record=7))
        >>> b = torch.randn(2, generator=r.generator(step=3, record=7))
        >>> torch.equal(a, b), r.secure
        (True, False)
    """

    def __init__(self, key: bytes, *, secure: bool):
        if not (isinstance(key, bytes) and len(key) == _KEY_BYTES):
            raise ValueError(f"Expected a {_KEY_BYTES}-byte key, got {type(key).__name__} of length "
                             f"{len(key) if isinstance(key, bytes) else '?'}.")
        self._key = key
        self.secure = secure

    @classmethod
    def fresh(cls) -> "PerRecordRandomness":
        """A new secret key from the OS's cryptographic source: what every real fine-tune uses."""
        return cls(secrets.token_bytes(_KEY_BYTES), secure=True)

    @classmethod
    def insecure_from_seed(cls, seed: int) -> "PerRecordRandomness":
        """A key derived from the PUBLIC ``seed``: reproducible for tests, NOT private."""
        return cls(hashlib.sha256(f"privimage insecure test key {int(seed)}".encode()).digest(), secure=False)

    def seed(self, step: int, record: int) -> int:
        """The 64-bit generator seed of ``record`` at ``step`` (a keyed BLAKE2b of the two integers)."""
        if step < 0 or record < 0:
            raise ValueError(f"Expected step={step} and record={record} >= 0.")
        digest = hashlib.blake2b(struct.pack("<QQ", step, record), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def generator(self, step: int, record: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator for ``record``'s draws at ``step``."""
        return torch.Generator(device).manual_seed(self.seed(step, record))

    def generators(self, step: int, records: Iterable[int | None],
                   device: torch.device | str = "cpu") -> Iterator[torch.Generator | None]:
        """One generator per entry of ``records`` (``None``, a padding row, gives ``None``), made lazily."""
        for record in records:
            yield None if record is None else self.generator(step, record, device)

    def state_dict(self) -> dict:
        """The key itself (hex): this is a SECRET, for the private checkpoint only."""
        return {"key": self._key.hex(), "secure": self.secure}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PerRecordRandomness":
        return cls(bytes.fromhex(state["key"]), secure=bool(state["secure"]))

    def __repr__(self) -> str:  # never print the key
        return f"PerRecordRandomness(secure={self.secure})"
