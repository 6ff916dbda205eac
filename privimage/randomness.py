"""Per-record secret randomness, the one home for it: every draw is a function of (key, stream, step, record).

It sits at the package's top level, not under ``privimage.train``, because three packages draw from it: the
diffusion loss (:meth:`privimage.diffusion.EDMLoss.draw_per_record`), the GAN (:mod:`privimage.gan`) and the
training loops that own the keys (:mod:`privimage.train`); under ``train`` it would make ``diffusion`` and
``gan`` import the training package, whose loops import them back.

A DP-SGD step may draw randomness for each sensitive record it touches (a diffusion fine-tune: the record's
label-dropout uniform, its K normals for ln σ and its K noise images, each on its own stream; a GAN fine-tune:
the latent and the label of the fake paired with the record). Those draws are part of the mechanism, so they
must be

* secret: the key comes from the operating system's entropy (``secrets``) and lives only in the private
  checkpoint, never in the public config or the release. If the draws came from the public config seed, an
  adversary who knows the config could replay them, and the sensitivity analysis would have to condition on
  them;
* per record: record i's draws at step t depend on (key, stream, t, i) and nothing else, so adding or
  removing a record never changes another record's draws, whatever the batch it falls in or its position.
  The engine clips each record's gradient to C, so adding one record moves the clipped sum by at most C
  *provided every other record's gradient stays the same*; draws handed out by position in a batch break
  that (issue 13);
* replayable: a resumed run draws exactly what the interrupted one would have (no generator state to save).

A counter-based generator gives all three at once: Philox4x32-10 (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC'11) maps a 128-bit counter and a 64-bit key to four 32-bit words; the counter is
(block j, record index, step, stream), and words 4j..4j+3 of a record's draw are block j's output. It is
vectorised over records and blocks in int64 torch arithmetic (every product split so that no intermediate
exceeds 2**63), on the device of the indices: one tensor program per chunk instead of one seeded generator
per record. Checked against Random123's known-answer vectors.

Memory: a call computes its words in chunks of at most :data:`CHUNK_WORDS` words (a run of records × a run
of blocks) and frees each chunk's temporaries before the next, so besides the tensor it returns it holds at
most 32 bytes of live temporaries per chunk word (nine int64 Philox buffers of a quarter word each, then the
words, their float64 uniforms and the Box–Muller stages): 32 · CHUNK_WORDS bytes, i.e. 8 MiB on CPU and
128 MiB on CUDA, plus whatever the allocator keeps around them (``bench/randomness.py`` measures the total).
A word depends only on its own counter, and a Box–Muller pair (words 2k, 2k+1) never straddles a block, so
the draws do not depend on the chunking.

Philox is a statistically strong generator, not a cryptographic one: the key is what must stay secret (like
the seed of the engine's secure noise generator, :func:`privimage.engine.secure_generator`).

Example:
    >>> draws = RecordRandomness.from_public_seed(0)   # tests only: NOT private
    >>> z = draws.normal(stream=1, step=3, indices=torch.tensor([5, 2]), n=4)
    >>> torch.equal(z[0], draws.normal(stream=1, step=3, indices=torch.tensor([5]), n=4)[0])
    True
    >>> draws
    RecordRandomness(secure=False)
"""

from __future__ import annotations

import math
import secrets
from typing import Callable

import numpy as np
import torch

__all__ = ["CHUNK_WORDS", "RecordRandomness", "philox4x32"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57          # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85          # key schedule (Weyl) increments
_ROUNDS = 10

#: The most 32-bit words computed at once, by device type (multiples of 4: whole Philox blocks): small on CPU
#: (a chunk's lanes stay in cache), large on accelerators (fewer kernel launches per call). Each bounds a
#: call's temporaries (module docstring); unlisted device types use the CPU's.
CHUNK_WORDS: dict[str, int] = {"cpu": 1 << 18, "cuda": 1 << 22}


def _mulhilo(a: torch.Tensor, m: int, hi: torch.Tensor | None = None, lo: torch.Tensor | None = None,
             tmp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product ``a · m`` (a: int64 in [0, 2**32), m < 2**32), written
    into ``hi``, ``lo`` (and scratch ``tmp``) when given, all of a's shape.

    a·m can reach 2**64, beyond int64; with m = m_hi·2**16 + m_lo: a·m = x·2**16 + y (x = a·m_hi < 2**48,
    y = a·m_lo < 2**48), x = x_hi·2**16 + x_lo, so a·m = x_hi·2**32 + (x_lo·2**16 + y) with the bracket < 2**49.
    """
    x = torch.mul(a, m >> 16, out=hi)
    s = torch.mul(a, m & 0xFFFF, out=lo)
    s.add_(torch.bitwise_and(x, 0xFFFF, out=tmp).bitwise_left_shift_(16))     # shift, not alpha: no int64 mul
    x.bitwise_right_shift_(16).add_(torch.bitwise_right_shift(s, 32, out=tmp))
    return x, s.bitwise_and_(_MASK32)


def _philox_lanes(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on the counter's four lanes (int64 words in [0, 2**32)); never writes them.

    The lanes broadcast against each other, and each round's outputs keep the smallest shape they can: with a
    (1, blocks) block lane, a (rows, 1) record lane and scalar step and stream lanes, the first rounds cost
    O(rows + blocks), not O(rows · blocks). Once every lane is full-sized (and owned: from round 2 on), the
    rounds run in place over nine full-sized buffers (the four lanes, four outputs, one scratch), allocating
    nothing: fresh allocations, not arithmetic, dominate small int64 ops on CPU. The outputs broadcast to the
    full shape and are not necessarily full-sized.
    """
    k0, k1 = key
    full = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    spare = None
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        if r and all(c.shape == full for c in (c0, c1, c2, c3)):
            if spare is None:
                spare = [torch.empty_like(c0) for _ in range(5)]
            hi0, lo0, hi1, lo1, tmp = spare
            _mulhilo(c0, _M0, hi0, lo0, tmp)
            _mulhilo(c2, _M1, hi1, lo1, tmp)
            spare = [c0, c1, c2, c3, tmp]                  # the old lanes are read below, then reused
            c0, c1, c2, c3 = (hi1.bitwise_xor_(c1).bitwise_xor_(k0), lo1,
                              hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0)
        else:
            hi0, lo0 = _mulhilo(c0, _M0)
            hi1, lo1 = _mulhilo(c2, _M1)
            c0, c1, c2, c3 = (torch.bitwise_xor(hi1, c1).bitwise_xor_(k0), lo1,
                              torch.bitwise_xor(hi0, c3).bitwise_xor_(k1), lo0)
    return c0, c1, c2, c3


def philox4x32(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of ``counter`` (..., 4) int64 words in [0, 2**32) under ``key`` (two 32-bit words).

    Returns (..., 4) int64 words in [0, 2**32).
    """
    return torch.stack(_philox_lanes(*(counter[..., i] for i in range(4)), key), dim=-1)


def _to_uniform(words: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1): (word + ½) / 2**32."""
    return words.double().add_(0.5).div_(2 ** 32)


def _box_muller(words: torch.Tensor, out: torch.Tensor) -> None:
    """Standard normals from word pairs (2k, 2k+1) into ``out`` (its width ≤ the words'): radius·cos(angle)
    at 2k, radius·sin(angle) at 2k+1, computed in float64 (|z| ≤ 6.7 from 32-bit words), rounded once."""
    u = _to_uniform(words)
    del words                                   # the caller passed its only reference: free it now
    width = out.shape[1]
    radius = u[:, 0::2].log().mul_(-2.0).sqrt_()
    angle = u[:, 1::2].mul(2.0 * math.pi)
    del u
    out[:, 0::2] = torch.cos(angle).mul_(radius)[:, :(width + 1) // 2]
    out[:, 1::2] = angle.sin_().mul_(radius)[:, :width // 2]


class RecordRandomness:
    """Counter-based draws keyed by a 64-bit key: ``stream`` names what is drawn, ``step`` the training step,
    ``indices`` the records (one output row per index, in the order given; repeats allowed).

    Every draw method returns ``(len(indices), n)`` on ``indices``' device (CUDA indices: the draws never leave
    the GPU), and its first m of n columns are the m-column draw, so a record's draws depend neither on the
    other records asked for nor on how many draws were asked for.

    Args:
        key: the 64-bit Philox key.
        secure: whether ``key`` came from the OS's entropy (:meth:`secret`); recorded in the state.
    """

    def __init__(self, key: int, *, secure: bool):
        if not (isinstance(key, int) and 0 <= key < 2 ** 64):   # never echo the value: it may be a secret
            raise ValueError(f"Expected the key to be an integer in [0, 2**64), got a {type(key).__name__}"
                             f"{' out of range' if isinstance(key, int) else ''}.")
        self._key = (key & _MASK32, key >> 32)
        self.secure = bool(secure)

    @classmethod
    def secret(cls) -> "RecordRandomness":
        """A key from the OS's cryptographic source: what a private run uses."""
        return cls(secrets.randbits(64), secure=True)

    @classmethod
    def from_public_seed(cls, seed: int) -> "RecordRandomness":
        """A key derived from a public seed, for reproducible tests and public draws (sample latents). NOT
        private: anyone who knows the seed knows every record's draws."""
        key = int(np.random.SeedSequence([int(seed), 0x6A4E]).generate_state(1, dtype=np.uint64)[0])
        return cls(key, secure=False)

    def state_dict(self) -> dict:
        """``{"key": int, "secure": bool}``: the key is SECRET in secure mode (private checkpoint only)."""
        return {"key": self._key[0] | self._key[1] << 32, "secure": self.secure}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RecordRandomness":
        return cls(state["key"], secure=bool(state["secure"]))

    def __repr__(self) -> str:  # never print the key
        return f"RecordRandomness(secure={self.secure})"

    def words(self, *, stream: int, step: int, indices: torch.Tensor, n: int) -> torch.Tensor:
        """(len(indices), n) int64 uniform 32-bit words; row r belongs to record ``indices[r]`` alone."""
        idx = self._check(stream, step, indices, n)
        out = torch.empty(len(idx), n, dtype=torch.int64, device=idx.device)
        return self._fill(out, stream, step, idx, lambda w, view: view.copy_(w[:, :view.shape[1]]))

    def uniform(self, *, stream: int, step: int, indices: torch.Tensor, n: int) -> torch.Tensor:
        """(len(indices), n) float64 uniforms in (0, 1): (word + ½) / 2**32."""
        idx = self._check(stream, step, indices, n)
        out = torch.empty(len(idx), n, dtype=torch.float64, device=idx.device)
        return self._fill(out, stream, step, idx, lambda w, view: view.copy_(_to_uniform(w)[:, :view.shape[1]]))

    def normal(self, *, stream: int, step: int, indices: torch.Tensor, n: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(indices), n) standard normals by Box–Muller on word pairs (2k, 2k+1), computed in float64 and
        rounded once to ``dtype``."""
        idx = self._check(stream, step, indices, n)
        out = torch.empty(len(idx), n, dtype=dtype, device=idx.device)
        return self._fill(out, stream, step, idx, _box_muller)

    def integers(self, *, stream: int, step: int, indices: torch.Tensor, high: int) -> torch.Tensor:
        """(len(indices),) int64 in [0, high): ⌊word · high / 2**32⌋ (bias ≤ high / 2**32)."""
        if not (isinstance(high, int) and 1 <= high < 2 ** 31):
            raise ValueError(f"Expected high={high!r} to be an integer in [1, 2**31).")
        return (self.words(stream=stream, step=step, indices=indices, n=1)[:, 0] * high) >> 32

    @staticmethod
    def _check(stream: int, step: int, indices: torch.Tensor, n: int) -> torch.Tensor:
        for name, value in (("stream", stream), ("step", step)):
            if not (isinstance(value, int) and 0 <= value < 2 ** 32):
                raise ValueError(f"Expected {name}={value!r} to be an integer in [0, 2**32).")
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"Expected n={n!r} (draws per record) to be an integer >= 0.")
        idx = torch.as_tensor(indices).to(torch.int64)
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2 ** 32)):
            raise ValueError(f"Expected indices to be a 1-D tensor of record indices in [0, 2**32), got "
                             f"shape {tuple(idx.shape)}.")
        return idx

    def _fill(self, out: torch.Tensor, stream: int, step: int, idx: torch.Tensor,
              write: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
        """Fill ``out`` (len(idx), n) chunk by chunk: ``write(words, view)`` turns a chunk's int64 words
        (rows, 4·blocks) into ``view``, the chunk's part of ``out`` (rows, ≤ 4·blocks columns)."""
        n = out.shape[1]
        blocks = -(-n // 4)
        if not (len(idx) and blocks):
            return out
        chunk_blocks = max(1, CHUNK_WORDS.get(idx.device.type, CHUNK_WORDS["cpu"]) // 4)
        per_row = min(blocks, chunk_blocks)
        rows = max(1, chunk_blocks // per_row)
        for r0 in range(0, len(idx), rows):
            for b0 in range(0, blocks, per_row):
                # No name holds the chunk's words, so ``write`` owns them and may free them early.
                write(self._chunk(stream, step, idx[r0:r0 + rows], b0, min(blocks, b0 + per_row)),
                      out[r0:r0 + rows, 4 * b0:min(n, 4 * (b0 + per_row))])
        return out

    def _chunk(self, stream: int, step: int, idx: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """(len(idx), 4·(b1 − b0)) int64: blocks b0..b1−1 of each record's draw (the Philox lanes are freed on
        return)."""
        dev = idx.device
        lanes = _philox_lanes(torch.arange(b0, b1, dtype=torch.int64, device=dev)[None, :], idx[:, None],
                              torch.tensor(step, device=dev), torch.tensor(stream, device=dev), self._key)
        return torch.stack(torch.broadcast_tensors(*lanes), dim=-1).reshape(len(idx), 4 * (b1 - b0))
