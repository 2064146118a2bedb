"""Writing one safetensors file from in-memory arrays, atomically."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from orbax_surgery.errors import SurgeryError
from orbax_surgery.sources.safetensors import DTYPES


def write_file(
    path: epath.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes one safetensors file (tensor names as given), atomically."""
    path = epath.Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header['__metadata__'] = dict(metadata)
    begin = 0
    names = {np.dtype(v).name: k for k, v in DTYPES.items()}
    arrays = {name: np.asarray(value, order='C') for name, value in tensors.items()}
    for name, value in arrays.items():
        if value.dtype.name not in names:
            raise SurgeryError(f'{name!r} has dtype {value.dtype}, which safetensors cannot hold.')
        header[name] = {
            'dtype': names[value.dtype.name],
            'shape': list(value.shape),
            'data_offsets': [begin, begin + value.nbytes],
        }
        begin += value.nbytes
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)
    tmp = path.parent / f'.{path.name}.tmp'
    with open(tmp, 'wb') as f:
        f.write(struct.pack('<Q', len(raw)))
        f.write(raw)
        for value in arrays.values():
            f.write(value.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
