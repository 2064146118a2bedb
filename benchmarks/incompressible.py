"""Seeded checkpoint values that compression cannot shrink, so bytes read are bytes stored."""

from __future__ import annotations


def random_float32(index: int, shape: tuple[int, ...]):
    """Random float32 bits, finite (exponent's top bit clear): zstd cannot shrink them.

    Args:
        index: Seeds the values; the same index and shape give the same array.
        shape: The array's shape.
    """
    import numpy as np

    bits = np.random.default_rng([0, index]).integers(0, 2**32, shape, dtype=np.uint32)
    bits &= np.uint32(~(1 << 30) & 0xFFFFFFFF)
    return bits.view(np.float32)
