"""Constants of the counter-based random numbers, shared by ``naive.py`` and ``kernel.py``.

The hash is Chris Wellons' ``lowbias32`` (xorshift-multiply, low avalanche bias); a row's two
32-bit keys come from its 64-bit seed and its step, and vocabulary index ``i`` of that row gets
``h = lowbias32(lowbias32(i ^ k0) ^ k1)``; the uniform is ``(2 * (h >> 9) + 1) * 2**-24``,
an odd multiple of ``2**-24`` in ``(0, 1)``, exact in fp32 (23 random bits). This module imports
neither torch nor triton.
"""

MASK32 = 0xFFFFFFFF
HASH_M1 = 0x7FEB352D  # lowbias32 multipliers
HASH_M2 = 0x846CA68B
SALT_SEED = 0x9E3779B9  # mixed into the seed's high word before the low word
SALT_KEY = 0x85EBCA6B  # derives the second key from the first
UNIFORM_SHIFT = 9  # 32 - 23 random bits
UNIFORM_SCALE = 2.0 ** -24

# Vocabulary entries per program of the sampling kernel. A constant (never derived from the
# batch) so that a row's log-sum-exp is summed in the same order whatever else is in the batch.
CHUNK = 2048


def lowbias32(x: int) -> int:
    """The hash on one Python int (for documentation and tests; the tensors use naive.py)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * HASH_M1) & MASK32
    x ^= x >> 15
    x = (x * HASH_M2) & MASK32
    return x ^ (x >> 16)


def row_keys(seed: int, step: int) -> tuple[int, int]:
    """The two keys of a row from its seed (any int, taken mod 2**64) and step (mod 2**32)."""
    seed &= (1 << 64) - 1
    k = lowbias32((seed >> 32) ^ SALT_SEED)
    k = lowbias32(k ^ (seed & MASK32))
    k0 = lowbias32(k ^ (step & MASK32))
    return k0, lowbias32(k0 ^ SALT_KEY)


def uniform(seed: int, step: int, index: int) -> float:
    """The uniform in (0, 1) of vocabulary entry ``index`` at ``(seed, step)``."""
    k0, k1 = row_keys(seed, step)
    h = lowbias32(lowbias32(index ^ k0) ^ k1)
    return (2 * (h >> UNIFORM_SHIFT) + 1) * UNIFORM_SCALE
