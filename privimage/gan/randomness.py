"""Per-record secret randomness: every draw is a function of (secret key, stream, step, record index).

A DP-SGD step may draw randomness for each sensitive record it touches (the GAN fine-tune: the latent and
the label of the fake image paired with record i; a diffusion fine-tune: the record's K noise levels, K noise
images and K label-dropout bits, i.e. ``normal(n=K)``, ``normal(n=K·C·H·W)`` and ``uniform(n=K)`` on three
streams). Those draws must be

* secret: the key comes from the operating system's entropy (``secrets``) and lives only in the private
  checkpoint, never in the public config or the release;
* per record: record i's draws at step t depend on (key, stream, t, i) and nothing else, so adding or
  removing a record never changes another record's draws, whatever the batch it falls in;
* replayable: a resumed run draws exactly what the interrupted one would have (no generator state to save).

A counter-based generator gives all three at once: Philox4x32-10 (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC'11) maps a 128-bit counter and a 64-bit key to four 32-bit words; the counter is
(block j, record index, step, stream). It is vectorised over records in int64 torch arithmetic (every
product split so that no intermediate exceeds 2**63), so a batch of 4096 records costs one small tensor
program instead of 4096 seeded generators. Checked against Random123's known-answer vectors.

Philox is a statistically strong generator, not a cryptographic one: the key is what must stay secret (like
the seed of the engine's secure noise generator, :func:`privimage.engine.secure_generator`).

Example:
    >>> draws = RecordRandomness.from_public_seed(0)   # tests only: NOT private
    >>> z = draws.normal(stream=1, step=3, indices=torch.tensor([5, 2]), n=4)
    >>> torch.equal(z[0], draws.normal(stream=1, step=3, indices=torch.tensor([5]), n=4)[0])
    True
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

__all__ = ["RecordRandomness", "philox4x32"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57          # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85          # key schedule (Weyl) increments
_ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product ``a · m`` (a: int64 in [0, 2**32), m < 2**32).

    a·m can reach 2**64, beyond int64; with m = m_hi·2**16 + m_lo: a·m = x·2**16 + y (x = a·m_hi < 2**48,
    y = a·m_lo < 2**48), x = x_hi·2**16 + x_lo, so a·m = x_hi·2**32 + (x_lo·2**16 + y) with the bracket < 2**49.
    """
    x = a * (m >> 16)
    s = (x & 0xFFFF) * 65536 + a * (m & 0xFFFF)
    return (x >> 16) + (s >> 32), s & _MASK32


def philox4x32(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of ``counter`` (..., 4) int64 words in [0, 2**32) under ``key`` (two 32-bit words).

    Returns (..., 4) int64 words in [0, 2**32).
    """
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


class RecordRandomness:
    """Counter-based draws keyed by a 64-bit key: ``stream`` names what is drawn, ``step`` the training step,
    ``indices`` the records (one output row per index, in the order given).

    Args:
        key: the 64-bit Philox key.
        secure: whether ``key`` came from the OS's entropy (:meth:`secret`); recorded in the state.
    """

    def __init__(self, key: int, *, secure: bool):
        if not (isinstance(key, int) and 0 <= key < 2 ** 64):
            raise ValueError(f"Expected key to be an integer in [0, 2**64), got {key!r}.")
        self._key = (key & _MASK32, key >> 32)
        self.secure = bool(secure)

    @classmethod
    def secret(cls) -> "RecordRandomness":
        """A key from the OS's cryptographic source: what a private run uses."""
        return cls(secrets.randbits(64), secure=True)

    @classmethod
    def from_public_seed(cls, seed: int) -> "RecordRandomness":
        """A key derived from a public seed, for reproducible tests. NOT private: anyone who knows the seed
        knows every record's draws."""
        key = int(np.random.SeedSequence([int(seed), 0x6A4E]).generate_state(1, dtype=np.uint64)[0])
        return cls(key, secure=False)

    def state_dict(self) -> dict:
        """The key (secret in secure mode: keep it in the private checkpoint only)."""
        return {"key": self._key[0] | self._key[1] << 32, "secure": self.secure}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RecordRandomness":
        return cls(int(state["key"]), secure=bool(state["secure"]))

    def words(self, *, stream: int, step: int, indices: torch.Tensor, n: int) -> torch.Tensor:
        """(len(indices), n) int64 uniform 32-bit words; row r belongs to record ``indices[r]`` alone.

        Computed on ``indices``' device (CUDA indices: the draws never leave the GPU); the first m of n words
        are the m words, so a record's draws do not depend on how many others were asked for.
        """
        for name, value in (("stream", stream), ("step", step)):
            if not (isinstance(value, int) and 0 <= value < 2 ** 32):
                raise ValueError(f"Expected {name}={value!r} to be an integer in [0, 2**32).")
        idx = torch.as_tensor(indices).to(torch.int64)
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2 ** 32)):
            raise ValueError(f"Expected indices to be a 1-D tensor of record indices in [0, 2**32), got "
                             f"shape {tuple(idx.shape)}.")
        blocks, dev = -(-n // 4), idx.device
        j = torch.arange(blocks, dtype=torch.int64, device=dev)
        counter = torch.stack(torch.broadcast_tensors(j[None, :], idx[:, None], torch.tensor(step, device=dev),
                                                      torch.tensor(stream, device=dev)), dim=-1)
        return philox4x32(counter, self._key).reshape(len(idx), blocks * 4)[:, :n]

    def uniform(self, *, stream: int, step: int, indices: torch.Tensor, n: int) -> torch.Tensor:
        """(len(indices), n) float64 uniforms in (0, 1): (word + ½) / 2**32."""
        return (self.words(stream=stream, step=step, indices=indices, n=n).double() + 0.5) / 2 ** 32

    def normal(self, *, stream: int, step: int, indices: torch.Tensor, n: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(indices), n) standard normals by Box–Muller on word pairs (2k, 2k+1), so the first m of n
        draws are the m draws (float64 maths; |z| ≤ 6.7 from 32-bit words)."""
        half = -(-n // 2)
        u = self.uniform(stream=stream, step=step, indices=indices, n=2 * half)
        radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
        angle = 2.0 * math.pi * u[:, 1::2]
        pairs = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2)
        return pairs.reshape(len(u), 2 * half)[:, :n].to(dtype)

    def integers(self, *, stream: int, step: int, indices: torch.Tensor, high: int) -> torch.Tensor:
        """(len(indices),) int64 in [0, high): ⌊word · high / 2**32⌋ (bias ≤ high / 2**32)."""
        if not (isinstance(high, int) and 1 <= high < 2 ** 31):
            raise ValueError(f"Expected high={high!r} to be an integer in [1, 2**31).")
        return (self.words(stream=stream, step=step, indices=indices, n=1)[:, 0] * high) >> 32
