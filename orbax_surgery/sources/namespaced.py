"""Several sources read as one, each under its own prefix (a base and its adapters)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Collection, Mapping

import numpy as np

from orbax_surgery.arrays.expr import Source
from orbax_surgery.arrays.regions import Region
from orbax_surgery.keys import KeyPath
from orbax_surgery.sources.source import ArraySource


class Namespaced:
    """Several sources read as one, each key prefixed by its source's name.

    A LoRA restore reads `base/...` from the base checkpoint and `adapters/...`
    from the adapter checkpoint in one plan, so a key may exist in both.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import TreeSource
        >>> both = Namespaced({'base': TreeSource({'w': np.ones(2)}),
        ...                    'adapters': TreeSource({'w': np.zeros(2)})})
        >>> sorted(both.arrays)
        ['adapters/w', 'base/w']
    """

    def __init__(self, sources: Mapping[str, ArraySource]):
        self.sources = dict(sources)
        self.arrays = {
            f'{name}/{key}': dataclasses.replace(src, key=f'{name}/{key}')
            for name, source in self.sources.items()
            for key, src in source.arrays.items()
        }

    def _inner(self, key: KeyPath) -> tuple[ArraySource, KeyPath]:
        name, _, inner = key.partition('/')
        return self.sources[name], inner

    async def open(self, keys: Collection[KeyPath]) -> None:
        by_source: dict[str, list[KeyPath]] = collections.defaultdict(list)
        for key in keys:
            name, _, inner = key.partition('/')
            by_source[name].append(inner)
        await asyncio.gather(*(self.sources[n].open(ks) for n, ks in by_source.items()))

    async def read(self, source: Source, region: Region) -> np.ndarray:
        inner_source, inner = self._inner(source.key)
        return await inner_source.read(dataclasses.replace(source, key=inner), region)
