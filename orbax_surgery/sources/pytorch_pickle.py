"""The pickle inside a torch.save file, read without torch and without running it.

`data.pkl` rebuilds tensors by calling `torch._utils._rebuild_tensor_v2` and
friends on storages it names by persistent id
(`('storage', FloatStorage, key, location, numel)`). A restricted unpickler
maps exactly those globals to functions that build plain records (`Tensor`,
`Storage`) and refuses every other global, so a file that would call
`os.system` is refused before anything runs. The records say where each
tensor's bytes are: the zip member `data/<key>` from `offset` elements on,
laid out by `shape` and `stride`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from orbax_surgery.arrays.regions import Shape
from orbax_surgery.errors import SourceReadError
from orbax_surgery.keys import KeyPath
from orbax_surgery.sources.safetensors import name_to_key

STORAGE_DTYPES: dict[str, np.dtype] = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
}
"""The typed storage classes torch pickles, by name (`torch.FloatStorage`)."""
TORCH_DTYPES: dict[str, np.dtype] = {
    **{n: np.dtype(np.float64) for n in ('float64', 'double')},
    **{n: np.dtype(np.float32) for n in ('float32', 'float')},
    **{n: np.dtype(np.float16) for n in ('float16', 'half')},
    'bfloat16': np.dtype(ml_dtypes.bfloat16),
    **{n: np.dtype(np.int64) for n in ('int64', 'long')},
    **{n: np.dtype(np.int32) for n in ('int32', 'int')},
    **{n: np.dtype(np.int16) for n in ('int16', 'short')},
    'int8': np.dtype(np.int8),
    'uint8': np.dtype(np.uint8),
    'uint16': np.dtype(np.uint16),
    'uint32': np.dtype(np.uint32),
    'uint64': np.dtype(np.uint64),
    'bool': np.dtype(np.bool_),
    **{n: np.dtype(np.complex64) for n in ('complex64', 'cfloat')},
    **{n: np.dtype(np.complex128) for n in ('complex128', 'cdouble')},
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
    'float8_e4m3fnuz': np.dtype(ml_dtypes.float8_e4m3fnuz),
    'float8_e5m2fnuz': np.dtype(ml_dtypes.float8_e5m2fnuz),
    'float8_e8m0fnu': np.dtype(ml_dtypes.float8_e8m0fnu),
}
"""torch dtypes as pickled (`torch.float8_e4m3fn`), e.g. by `_rebuild_tensor_v3`."""


class _Record:
    """A record a pickle builds or names, which its BUILD opcodes cannot change.

    Unpickling sets an object's state through `__setstate__`, or straight into
    its `__dict__`, frozen or not; refusing that keeps a file from altering the
    records (and the shared ones in `_ALLOWED`) that later files are read with.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TypeError(f'{type(self).__name__} records are read-only')

    def __reduce__(self) -> tuple[Any, ...]:  # Copied and pickled through the constructor.
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class TorchDtype(_Record):
    """A torch dtype or storage class the pickle names, and the NumPy dtype it holds."""

    name: str
    dtype: np.dtype
    untyped: bool = False
    """An `UntypedStorage`: its numel counts bytes; the tensor gives the dtype."""


@dataclasses.dataclass(frozen=True)
class Storage(_Record):
    """A storage the pickle refers to: the zip member `data/<key>`."""

    key: str
    dtype: np.dtype
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Tensor(_Record):
    """A tensor as saved: a strided view of `offset` elements into a storage."""

    storage: Storage
    offset: int
    shape: Shape
    stride: tuple[int, ...]
    dtype: np.dtype

    @property
    def byte_span(self) -> tuple[int, int]:
        """The bytes of its storage it covers, [first, end)."""
        first = self.offset * self.dtype.itemsize
        if 0 in self.shape:
            return first, first
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        return first, (last + 1) * self.dtype.itemsize

    @property
    def order(self) -> tuple[int, ...] | None:
        """Axes in the order that makes it a C-contiguous block, or None if none does.

        `(0, 1)` for a contiguous matrix, `(1, 0)` for a transposed view; None
        for a strided slice or an expanded (stride 0) view.
        """
        ordinary = tuple(range(len(self.shape)))
        if 0 in self.shape:
            return ordinary
        moving = [a for a in ordinary if self.shape[a] != 1]  # Size-1 axes' strides are free.
        order = sorted(moving, key=lambda a: -self.stride[a])
        expected = 1
        for a in reversed(order):
            if self.stride[a] != expected:
                return None
            expected *= self.shape[a]
        if order == moving:
            return ordinary
        return tuple(a for a in ordinary if self.shape[a] == 1) + tuple(order)


def load(data: bytes, where: str) -> Any:
    """The tree `data.pkl` holds, tensors as `Tensor` records; runs none of its code.

    Raises:
        SourceReadError: It names a global other than torch's tensor rebuilders,
            storage classes, dtypes and plain containers, or it is malformed.
    """
    try:
        return _Unpickler(io.BytesIO(data), where).load()
    except SourceReadError:
        raise
    except Exception as e:  # Any malformed pickle: EOFError, UnpicklingError, TypeError, ...
        raise SourceReadError(
            f'{where}: its pickle (data.pkl) is malformed: {type(e).__name__}: {e}'
        ) from e


def flatten(tree: Any, where: str) -> tuple[dict[KeyPath, Tensor], dict[KeyPath, str]]:
    """The tensors of a loaded tree by key, and its other leaves' type names.

    Keys join dict keys and list indices with '/', names split at '.':
    `{'model': {'layers.0.weight': t}}` gives 'model/layers/0/weight'.
    """
    tensors: dict[KeyPath, Tensor] = {}
    skipped: dict[KeyPath, str] = {}

    def visit(node: Any, key: KeyPath) -> None:
        if isinstance(node, Tensor):
            if key in tensors:
                raise SourceReadError(
                    f"{where}: two tensors have the key {key!r} (names are split at '.' and "
                    "nested dicts joined with '/'): a name collides with a nested path."
                )
            tensors[key] = node
        elif isinstance(node, dict):
            for name, child in node.items():
                visit(child, _join(key, name_to_key(str(name))))
        elif isinstance(node, list | tuple):
            for i, child in enumerate(node):
                visit(child, _join(key, str(i)))
        else:
            skipped[key] = (
                f'torch.{node.name}' if isinstance(node, TorchDtype) else type(node).__name__
            )

    try:
        visit(tree, '')
    except RecursionError as e:
        raise SourceReadError(f'{where}: its tree is nested too deeply (or in a cycle).') from e
    return tensors, skipped


def _join(prefix: KeyPath, name: KeyPath) -> KeyPath:
    return f'{prefix}/{name}' if prefix else name


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED`; storages become `Storage` records."""

    def __init__(self, file: io.BytesIO, where: str):
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None and module == 'torch':
            found = _dtype_tag(name)
        if found is None:
            raise SourceReadError(
                f"{self._where}: refuses to load '{module}.{name}' from its pickle: not a tensor, "
                'a supported dtype or a plain container; orbax-surgery never executes pickled '
                'code. Save only tensors (a state_dict) or convert the file to safetensors.'
            )
        return found

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise SourceReadError(
                f'{self._where}: its pickle refers to {str(pid)[:80]!r}, not to a storage.'
            )
        _, kind, key, _, numel = pid
        if not isinstance(kind, TorchDtype) or not isinstance(numel, int) or numel < 0:
            raise SourceReadError(f'{self._where}: its pickle has a malformed storage {pid!r}.')
        return Storage(str(key), kind.dtype, numel * kind.dtype.itemsize)


def _dtype_tag(name: str) -> TorchDtype | None:
    if name in STORAGE_DTYPES:
        return TorchDtype(name, STORAGE_DTYPES[name])
    if name in TORCH_DTYPES:
        return TorchDtype(name, TORCH_DTYPES[name])
    return None


def _tensor(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> Tensor:
    if not isinstance(storage, Storage):
        raise TypeError(f'a tensor rebuilt from {type(storage).__name__}, not a storage')
    shape, strides = tuple(size), tuple(stride)
    numbers = [offset, *shape, *strides]
    if not all(isinstance(n, int) and n >= 0 for n in numbers) or len(shape) != len(strides):
        raise TypeError(f'a tensor with offset {offset!r}, size {size!r}, stride {stride!r}')
    return Tensor(storage, offset, shape, strides, storage.dtype if dtype is None else dtype)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> Tensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, *_grad_hooks_metadata: Any
) -> Tensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
) -> Tensor:
    if not isinstance(dtype, TorchDtype) or dtype.name not in TORCH_DTYPES:
        raise TypeError(f'a tensor of dtype {dtype!r}')
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, *_grad_hooks_state: Any) -> Tensor:
    if not isinstance(data, Tensor):
        raise TypeError(f'a parameter holding {type(data).__name__}')
    return data


@dataclasses.dataclass(frozen=True)
class _TensorType(_Record):
    """`torch.Tensor` or `torch.nn.Parameter`, named by a tensor that carried attributes."""

    name: str


_TENSOR_TYPES = (_TensorType('Tensor'), _TensorType('Parameter'))


class _Call:
    """A function the pickle may call, sealed: its BUILD opcodes cannot change it."""

    __slots__ = ('_func',)
    _func: Callable[..., Any]

    def __init__(self, func: Callable[..., Any]):
        object.__setattr__(self, '_func', func)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f'{self!r} is read-only')

    def __setstate__(self, state: Any) -> None:
        raise TypeError(f'{self!r} is read-only')

    def __call__(self, *args: Any) -> Any:
        return self._func(*args)

    def __repr__(self) -> str:
        return self._func.__name__


_REBUILDERS: dict[str, _Call] = {
    '_rebuild_tensor': _Call(_rebuild_tensor),
    '_rebuild_tensor_v2': _Call(_rebuild_tensor_v2),
    '_rebuild_tensor_v3': _Call(_rebuild_tensor_v3),
    '_rebuild_parameter': _Call(_rebuild_parameter),
    '_rebuild_parameter_with_state': _Call(_rebuild_parameter),
}


def _rebuild_from_type(func: Any, new_type: Any, args: Any, _state: Any) -> Tensor:
    """A tensor whose Python object carried attributes: rebuilt as the plain tensor."""
    if not any(func is f for f in _REBUILDERS.values()) or new_type not in _TENSOR_TYPES:
        raise TypeError(f'a tensor of type {new_type!r} rebuilt by {func!r}')
    return func(*args)


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(*args)


def _device(*args: Any) -> str:
    return ':'.join(str(a) for a in args)


def _encode(text: Any, encoding: str = 'latin1') -> bytes:
    """`_codecs.encode`, as protocol 2 pickles bytes: for text only."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise TypeError(f'_codecs.encode of {type(text).__name__} as {encoding!r}')
    return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    **{('torch._utils', name): call for name, call in _REBUILDERS.items()},
    ('torch._tensor', '_rebuild_from_type_v2'): _Call(_rebuild_from_type),
    ('torch', 'Tensor'): _TENSOR_TYPES[0],
    ('torch.nn.parameter', 'Parameter'): _TENSOR_TYPES[1],
    ('torch.storage', 'UntypedStorage'): TorchDtype('UntypedStorage', np.dtype(np.uint8), True),
    ('torch', 'UntypedStorage'): TorchDtype('UntypedStorage', np.dtype(np.uint8), True),
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): _Call(_size),
    ('torch', 'device'): _Call(_device),
    ('_codecs', 'encode'): _Call(_encode),
}
"""Every global a pickle may name (besides torch dtypes and storage classes): records, sealed
functions and `OrderedDict`, none of which a BUILD opcode can alter for later files."""
