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


INDEX = 'model.safetensors.index.json'


def write_sharded_safetensors(root, tensors: dict, max_shard_bytes: int) -> None:
    """Writes float32 `tensors` ({name: shape}) of `random_float32` values as transformers
    shards them: files in tensor order, each at most `max_shard_bytes` (or one tensor),
    then the index, last, so that its presence says the checkpoint is complete.
    """
    import json
    import math
    from pathlib import Path

    from safetensors.numpy import save_file

    root = Path(root)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in tensors.items():
        nbytes = 4 * math.prod(shape)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    root.mkdir(parents=True, exist_ok=True)
    seed = {name: i for i, name in enumerate(tensors)}
    weight_map = {}
    for n, names in enumerate(groups):
        file = f'model-{n + 1:05d}-of-{len(groups):05d}.safetensors'
        values = {name: random_float32(seed[name], tensors[name]) for name in names}
        save_file(values, str(root / file), metadata={'format': 'pt'})
        weight_map.update(dict.fromkeys(names, file))
        del values
    total = sum(4 * math.prod(shape) for shape in tensors.values())
    meta = {'metadata': {'total_size': total}, 'weight_map': weight_map}
    (root / INDEX).write_text(json.dumps(meta, indent=2))
