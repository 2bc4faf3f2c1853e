"""Cheap dropout masks: one Philox call per 4 elements, 32-bit thresholds, 128-bit counters.

``tl.rand`` runs a full Philox-4x32-10 per element and keeps one of its four 32-bit outputs.
Here one Philox-4x32-7 call serves 4 elements; an element is kept when its word is >= floor(2**32 p),
so the keep probability is 1 - p to within 2**-32 (p as the kernel argument's fp32 value), and
kept values are scaled by 1 / (1 - p). The counter is four 32-bit words, so no offset is ever
multiplied into one integer that could wrap:

* attention (``attention_keep``): counter (key // 2, 8 * (query // 16) + query % 8,
  batch * heads + head, stream), queries and keys counted from the start of their segment;
  one call serves queries r and r + 8 times keys c and c + 1, the four elements one thread
  holds of an MMA accumulator, so the words need no shared-memory reshuffle to reach the score
  tile. A tile starts at a query multiple of 16 and an even key. The words are spread over the
  tile by broadcasting and selecting, not by ``tl.join``: Triton 3.6 halves a dot operand's
  kWidth when a join feeds it, which cost the P @ V dot its ldmatrix loads (self 36 forward
  1040 -> 928 SASS instructions there).
* LayerNorm (``layer_norm_keep``): counter (column // 4, row low word, row high word, 1); one call
  serves 4 consecutive columns (as ``tl.randint4x`` does). A tile starts at a column multiple of 4.

A mask element depends only on the seed and its indices, never on a tile size, so every kernel
(forward, backward, the multi-launch and one-tile paths, the mask helpers) regenerates the same
mask whatever its block sizes.

Measured offline for sm_90 (kernels/README.md): 32-bit words cost fewer SASS instructions than
one call per 8 or 16 elements with 16- or 8-bit thresholds, whose extra unpacking outweighs
the Philox calls they save at these tiles. ``philox4x32`` is Triton's ``tl.philox`` written with
one 32x32->64-bit multiply per product.

Rounds: ``PHILOX_ROUNDS`` = 7, the dropout generator of flash-attention 2 and of Composable
Kernel's attention (their ``philox.cuh``: "7-round philox"). Salmon et al. (SC 2011) report
Philox-4x32 passing all of TestU01's BigCrush from 7 rounds; the 10 of ``tl.philox`` and
cuRAND add a safety margin a dropout mask does not need. Each round is two wide multiplies and two
3-input XORs, so 7 rounds cut the mask's arithmetic by 30% (offline figures in kernels/README.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

GROUP = 4  # columns per Philox call
PHILOX_ROUNDS = tl.constexpr(7)  # rounds of every dropout mask (see the module docstring)


@triton.jit
def _mulhilo(a, M: tl.constexpr):
    """(high, low) 32-bit words of the 64-bit product a * M: one wide multiply (IMAD.WIDE)
    instead of separate mul.hi and mul.lo."""
    prod = a.to(tl.uint64) * M
    return (prod >> 32).to(tl.uint32), prod.to(tl.uint32)


@triton.jit
def philox4x32(seed, c0, c1, c2, c3, N_ROUNDS: tl.constexpr):
    """Philox-4x32 (Salmon et al. 2011), same words as ``tl.philox`` for 32-bit counters."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + 0x9E3779B9  # uint32: wraps modulo 2**32
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def keep_tile(seed, c1, c2, c3, col_start, dropout_p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Boolean (ROWS, COLS) keep mask for columns [col_start, col_start + COLS).

    seed: int64 scalar (loaded from the seed tensor); c1: (ROWS,) row words (any int type, the
    low 32 bits count); c2, c3: uint32 scalars / (ROWS, 1) uint32 tensors or int literals;
    col_start: a multiple of 4; COLS a multiple of 4.
    """
    G: tl.constexpr = COLS // 4
    groups = (col_start // 4 + tl.arange(0, G)).to(tl.uint32)
    zero = tl.zeros([ROWS, G], dtype=tl.uint32)
    c0 = zero + groups[None, :]
    w1 = zero + c1.to(tl.uint32)[:, None]
    w2 = zero + c2
    w3 = zero + c3
    r0, r1, r2, r3 = philox4x32(seed, c0, w1, w2, w3, PHILOX_ROUNDS)
    # (ROWS, G, 2, 2) -> (ROWS, COLS): column 4 g + 2 i + j takes word r[2 j + i]
    u = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (ROWS, COLS))
    thresh = tl.cast(dropout_p * 4294967296.0, tl.uint32)  # floor(2**32 p); p < 1
    return u >= thresh


@triton.jit
def attention_keep(seed, bh, row_start, col_start, stream, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attention keep mask (BLOCK_M, BLOCK_N) for query rows [row_start, row_start + BLOCK_M) and
    key columns [col_start, col_start + BLOCK_N), both counted inside their segment; program
    ``bh`` = b * H + h; ``stream`` 0 for plain attention and cross direction 0, 2 for cross
    direction 1 (LayerNorm uses 1). row_start a multiple of 16, col_start even.

    One Philox call serves a 2 x 2 block: rows r and r + 8 of a 16-row group, columns c and c + 1
    (c even): element (row, col) takes word 2 * ((row // 8) % 2) + col % 2 of
    Philox(seed, (col // 2, 8 * (row // 16) + row % 8, bh, stream)). These are the four elements
    one thread holds of an MMA accumulator (rows t // 4 and t // 4 + 8, columns 2 (t % 4) and
    + 1), so the words reach the score tile without a trip through shared memory. The mask
    depends only on (seed, bh, stream, row, col), never on the tile sizes.
    """
    tl.static_assert(BLOCK_M % 16 == 0, "attention_keep: BLOCK_M must be a multiple of 16")
    tl.static_assert(BLOCK_N % 8 == 0, "attention_keep: BLOCK_N must be a multiple of 8")
    A: tl.constexpr = BLOCK_M // 16
    J: tl.constexpr = BLOCK_N // 8
    # grid (a, b, c, j, t, e): row row_start + 16 a + 8 b + c, column col_start + 8 j + 2 t + e;
    # the Philox call of (a, c, j, t) serves the 2 x 2 block (b, e): it runs on tensors of extent
    # 1 in b and e, and its four words are broadcast and picked by (b, e) (no tl.join: see the
    # module docstring)
    a = tl.arange(0, A)[:, None, None, None, None, None]
    b = tl.arange(0, 2)[None, :, None, None, None, None]
    c = tl.arange(0, 8)[None, None, :, None, None, None]
    j = tl.arange(0, J)[None, None, None, :, None, None]
    t = tl.arange(0, 4)[None, None, None, None, :, None]
    e = tl.arange(0, 2)[None, None, None, None, None, :]
    zero = tl.zeros([A, 1, 8, J, 4, 1], dtype=tl.uint32)
    c0 = zero + (col_start // 2 + 4 * j + t).to(tl.uint32)
    c1 = zero + (row_start // 2 + 8 * a + c).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32(seed, c0, c1, zero + bh.to(tl.uint32), zero + stream, PHILOX_ROUNDS)
    words = tl.where(b == 0, tl.where(e == 0, r0, r1), tl.where(e == 0, r2, r3))  # word 2 b + e
    u = tl.reshape(words, (BLOCK_M, BLOCK_N))
    thresh = tl.cast(dropout_p * 4294967296.0, tl.uint32)  # floor(2**32 p); p < 1
    return u >= thresh


@triton.jit
def layer_norm_keep(seed, rows, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LayerNorm keep mask (BLOCK_M, BLOCK_N) for int64 ``rows`` and columns [0, BLOCK_N)."""
    rows64 = rows.to(tl.int64)
    return keep_tile(seed, (rows64 & 0xFFFFFFFF).to(tl.uint32), (rows64 >> 32).to(tl.uint32)[:, None], 1, 0,
                     dropout_p, BLOCK_M, BLOCK_N)
