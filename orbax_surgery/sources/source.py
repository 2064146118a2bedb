"""The source protocol: stored arrays whose metadata is known up front, read by region."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

import numpy as np

from orbax_surgery.arrays.expr import Source
from orbax_surgery.arrays.regions import Region
from orbax_surgery.keys import KeyPath


class ArraySource(Protocol):
    """Stored arrays: metadata up front, data only through `read`."""

    @property
    def arrays(self) -> Mapping[KeyPath, Source]:
        """The stored arrays' shapes, dtypes and chunks, by key."""

    async def open(self, keys: Collection[KeyPath]) -> None:
        """Prepares `keys` for reading (opens their stores); reads no array data."""

    async def read(self, source: Source, region: Region) -> np.ndarray:
        """Reads one region of one array."""


def key_region(key: KeyPath, region: Region) -> str:
    """`'w'[0:4, 2:3]`: a key and a region, for messages."""
    parts = ', '.join(f'{r.start}:{r.stop}' + (f':{r.step}' if r.step != 1 else '') for r in region)
    return f'{key!r}[{parts}]'
