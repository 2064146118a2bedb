"""PyTorch checkpoints (torch.save files) as a lazy source, read without torch.

Reads `pytorch_model.bin`, a sharded `pytorch_model-0000i-of-0000n.bin` set
with its `pytorch_model.bin.index.json`, any single `.bin`/`.pth`/`.pt`, and
Meta's `consolidated.NN.pth` (one file, or a directory of model-parallel
parts, gathered into whole tensors). Opening reads each file's zip directory
and pickle (`pytorch_zip`, `pytorch_pickle`: no pickled code runs); reading a
region reads just its bytes, locally or at a gs://, s3:// or http(s):// URL,
as `SafetensorsCheckpoint` does.

Keys are the tensor names with '.' turned into '/' (as for safetensors, so
`from_pytorch` rules serve both), nested dicts joined with '/':
`{'model': {'layers.0.weight': t}}` is `model/layers/0/weight`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import weakref
from collections.abc import Collection

import numpy as np
from etils import epath

from orbax_surgery import locations
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Source
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import SourceReadError, SurgeryError
from orbax_surgery.keys import KeyPath, did_you_mean
from orbax_surgery.sources import pytorch_files, pytorch_pickle, pytorch_zip
from orbax_surgery.sources.file_reads import ByteFile, open_file
from orbax_surgery.sources.pytorch_files import CONSOLIDATED, INDEX_FILE
from orbax_surgery.sources.pytorch_pickle import Tensor
from orbax_surgery.sources.pytorch_zip import Member
from orbax_surgery.sources.safetensors import key_to_name, name_to_key

LLAMA_SPLIT_AXES: tuple[tuple[str, int | None], ...] = (
    (r'(.+\.)?tok_embeddings\.weight', 1),
    (r'(.+\.)?output\.weight', 0),
    (r'(.+\.)?attention\.w[qkv]\.weight', 0),
    (r'(.+\.)?feed_forward\.w[13]\.weight', 0),
    (r'(.+\.)?attention\.wo\.weight', 1),
    (r'(.+\.)?feed_forward\.w2\.weight', 1),
    (r'(.+\.)?(attention_norm|ffn_norm|norm)\.weight|rope\.freqs', None),
)
"""The axis Meta's Llama reference code splits each tensor along across
model-parallel `consolidated.NN.pth` files; None: replicated (file 0's is read)."""
_SUPPORTED = (
    'tok_embeddings.weight [1], output.weight [0], *.attention.wq/wk/wv.weight [0], '
    '*.feed_forward.w1/w3.weight [0], *.attention.wo.weight [1], *.feed_forward.w2.weight [1]; '
    'norms and rope.freqs are replicated'
)


@dataclasses.dataclass(frozen=True)
class _Part:
    """One file's tensor: the zip member holding its storage, and its layout there."""

    file: str
    member: Member
    tensor: Tensor
    big_endian: bool


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A logical tensor: one part, or parts joined along `axis` (model-parallel files)."""

    parts: tuple[_Part, ...]
    axis: int | None = None


class PyTorchCheckpoint:
    """PyTorch `torch.save` checkpoints, read lazily, without torch and without running pickles.

    Args:
        path: A `.bin`, `.pth` or `.pt` file (torch >= 1.6 zip format), a
            `pytorch_model.bin.index.json`, or a directory holding
            `pytorch_model.bin`, that index, or Meta's `consolidated.NN.pth`
            files; a local path or a gs://, s3:// or http(s):// URL. Several
            consolidated files are model-parallel parts: each tensor is
            gathered along the axis Llama's reference code split it on
            (`LLAMA_SPLIT_AXES`); one such file given alone reads as stored.

    Attributes:
        location: Where it is, as given (a local path made absolute, or a URL).
        directory: The directory holding its files.
        files: The files read, in order.
        arrays: Each tensor's shape and dtype, by key ('/'-joined name).
        skipped: The tree's leaves that are not tensors (step counters,
            strings), by key: their type names.
        bytes_read: Bytes of tensor data read so far (zip and pickle not counted).

    Example:
        >>> import tempfile, torch  # torch only writes the example file.
        >>> path = tempfile.mkdtemp() + '/pytorch_model.bin'
        >>> torch.save({'lm_head.weight': torch.ones(2, 3), 'step': 7}, path)
        >>> src = PyTorchCheckpoint(path)
        >>> src.arrays['lm_head/weight'].shape, src.skipped
        ((2, 3), {'step': 'int'})
    """

    def __init__(self, path: epath.PathLike):
        self.location = locations.absolute(path)
        self.arrays: dict[KeyPath, Source] = {}
        self.skipped: dict[KeyPath, str] = {}
        self.bytes_read = 0
        self._layouts: dict[KeyPath, _Layout] = {}
        self._starts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._member_locks: dict[tuple[str, str], threading.Lock] = {}
        self._files: dict[str, ByteFile] = {}
        weakref.finalize(self, _close_all, self._files)
        files, expected, self.directory = pytorch_files.files(self.location)
        self.files: tuple[str, ...] = tuple(files)
        opened = [self._tensors_of(file) for file in files]
        if len(files) > 1 and all(CONSOLIDATED.fullmatch(locations.name(f)) for f in files):
            self._layouts = _gather(opened, locations.shown(self.directory))
        else:
            for file, parts in zip(files, opened, strict=True):
                for key, part in parts.items():
                    if key in self._layouts:
                        raise SourceReadError(
                            f'Tensor {key_to_name(key)!r} is in two files: '
                            f'{self._layouts[key].parts[0].file} and {file}.'
                        )
                    self._layouts[key] = _Layout((part,))
        for name, file in expected.items():
            key = name_to_key(name)
            if key not in self._layouts:
                raise SourceReadError(
                    f'{INDEX_FILE} puts {name!r} in {file}, but that file has no such tensor.'
                    f'{did_you_mean(key, self._layouts)}'
                )
        for key, layout in self._layouts.items():
            first = layout.parts[0].tensor
            shape = list(first.shape)
            if layout.axis is not None:
                shape[layout.axis] = sum(p.tensor.shape[layout.axis] for p in layout.parts)
            exact = all(p.tensor.order is not None for p in layout.parts)
            self.arrays[key] = Source(key, tuple(shape), first.dtype, None, 'jax.Array', exact)

    @property
    def path(self) -> epath.Path:
        """The location as an `epath.Path` (local or in object storage)."""
        return epath.Path(self.location)

    def __repr__(self):
        return f'PyTorchCheckpoint({locations.shown(self.location)!r}, {len(self.arrays)} tensors)'

    async def open(self, keys: Collection[KeyPath]) -> None:
        return None  # Files open on their first read (a remote one holds no handle).

    async def read(self, source: Source, region: Region) -> np.ndarray:
        return await asyncio.to_thread(self.read_now, source, region)

    def read_now(self, source: Source, region: Region) -> np.ndarray:
        """Reads one region of one tensor, blocking: from only the files it overlaps."""
        layout = self._layouts[source.key]
        ascending, flips = regions.split_ascending(region)
        if layout.axis is None:
            block = self._read_part(source.key, layout.parts[0], ascending)
        else:
            axis = layout.axis
            block = np.empty(regions.shape_of(ascending), source.dtype)
            sizes = [p.tensor.shape[axis] for p in layout.parts]
            for piece, positions, sub in regions.pieces(ascending[axis], sizes):
                part_region = ascending[:axis] + (sub,) + ascending[axis + 1 :]
                at = (slice(None),) * axis + (regions.to_slice(positions),)
                block[at] = self._read_part(source.key, layout.parts[piece], part_region)
        return np.flip(block, flips) if flips else block

    def _read_part(self, key: KeyPath, part: _Part, region: Region) -> np.ndarray:
        tensor = part.tensor
        file = self._file(part.file)
        order = tensor.order
        try:
            offset = self._data_start(file, part.member) + tensor.offset * tensor.dtype.itemsize
            if order is None:
                block = self._read_strided(file, offset, tensor, region)
            else:  # C order once its axes are permuted: exact ranged reads, transposed back.
                shape = tuple(tensor.shape[a] for a in order)
                block = file.read_region(
                    offset, shape, tensor.dtype, tuple(region[a] for a in order)
                )
                self.bytes_read += block.nbytes
        except (OSError, ValueError) as e:
            first, end = tensor.byte_span
            raise SourceReadError(
                f'Reading {key!r} from {locations.shown(part.file)} (member {part.member.name!r}, '
                f'bytes {first}..{end} of it) failed (was the file changed after it was '
                f'opened?): {e}'
            ) from e
        block = _native(block) if part.big_endian else block
        if order is None or order == tuple(sorted(order)):
            return block
        return block.transpose(np.argsort(order))

    def _read_strided(
        self, file: ByteFile, offset: int, tensor: Tensor, region: Region
    ) -> np.ndarray:
        """A saved view no axis order makes contiguous (a strided slice, an expanded tensor).

        Correctness first: reads the whole span the region covers, then takes the
        region from it with `np.lib.stride_tricks.as_strided`.
        """
        itemsize = tensor.dtype.itemsize
        if regions.size_of(region) == 0:
            return np.empty(regions.shape_of(region), tensor.dtype)
        first = sum(r.start * s for r, s in zip(region, tensor.stride, strict=True))
        last = sum(r[-1] * s for r, s in zip(region, tensor.stride, strict=True))
        raw = file.read(offset + first * itemsize, (last - first + 1) * itemsize)
        self.bytes_read += len(raw)
        span = np.frombuffer(raw, tensor.dtype)
        strides = tuple(s * r.step * itemsize for s, r in zip(tensor.stride, region, strict=True))
        view = np.lib.stride_tricks.as_strided(span, regions.shape_of(region), strides)
        return view.copy()

    def _data_start(self, file: ByteFile, member: Member) -> int:
        """Where a member's bytes start, its local header read once however many threads ask."""
        at = (file.location, member.name)
        start = self._starts.get(at)
        if start is None:
            with self._lock:
                lock = self._member_locks.setdefault(at, threading.Lock())
            with lock:
                start = self._starts.get(at)
                if start is None:
                    start = self._starts[at] = pytorch_zip.data_start(file, member)
        return start

    def _tensors_of(self, location: str) -> dict[KeyPath, _Part]:
        """One file's tensors, from its zip directory and pickle."""
        file, where = self._file(location), locations.shown(location)
        try:
            directory = pytorch_zip.read_directory(file)
            pickles = [n for n in directory.members if n.rpartition('/')[2] == 'data.pkl']
            if len(pickles) != 1:
                raise SourceReadError(
                    f'{where} is a zip archive but not a torch.save file: it holds '
                    f'{len(pickles)} data.pkl members, not one.'
                )
            prefix = pickles[0][: -len('data.pkl')]
            data = pytorch_zip.read_member(file, directory, directory.members[pickles[0]])
            tree = pytorch_pickle.load(data, where)
            order = directory.members.get(prefix + 'byteorder')
            byteorder = (
                pytorch_zip.read_member(file, directory, order).decode() if order else 'little'
            )
        except SurgeryError:
            raise
        except (OSError, ValueError) as e:
            raise SourceReadError(f'Cannot read {where} as a PyTorch checkpoint: {e}') from e
        if byteorder not in ('little', 'big'):
            raise SourceReadError(f'{where} gives its byte order as {byteorder!r}.')
        tensors, skipped = pytorch_pickle.flatten(tree, where)
        self.skipped.update(skipped)
        parts = {}
        for key, tensor in tensors.items():
            member = directory.members.get(f'{prefix}data/{tensor.storage.key}')
            _check_member(where, key, tensor, member, directory.start, f'{prefix}data/')
            assert member is not None
            parts[key] = _Part(location, member, tensor, byteorder == 'big')
        return parts

    def _file(self, location: str) -> ByteFile:
        file = self._files.get(location)
        if file is None:
            file = self._files[location] = open_file(location)
        return file

    def close(self) -> None:
        """Closes the files (reading again reopens them)."""
        _close_all(self._files)


def _close_all(files: dict[str, ByteFile]) -> None:
    for file in files.values():
        file.close()
    files.clear()


def _native(block: np.ndarray) -> np.ndarray:
    """A block of a big-endian file with its bytes swapped into this machine's order."""
    if block.dtype.itemsize == 1:
        return block
    unit = block.dtype.itemsize // (2 if block.dtype.kind == 'c' else 1)
    flat = np.ascontiguousarray(block).reshape(-1).view(f'u{unit}').byteswap()
    return flat.view(block.dtype).reshape(block.shape)


def _check_member(
    where: str, key: KeyPath, tensor: Tensor, member: Member | None, end: int, folder: str
) -> None:
    """The tensor's storage member exists, is stored plainly and holds all its bytes."""
    first, last = tensor.byte_span
    what = f'{key_to_name(key)!r} ({tensor.dtype.name}{list(tensor.shape)})'
    if member is None:
        raise SourceReadError(
            f'{where}: {what} lies in bytes {first}..{last} of the zip member '
            f'{folder}{tensor.storage.key}, which the archive lacks: it is damaged.'
        )
    if member.method != 0 or member.flags & 1:
        raise SourceReadError(
            f'{where}: the zip member {member.name!r} holding {what} is compressed or '
            'encrypted; torch.save stores members as they are, so the file was repacked. '
            'Re-save it with torch.save or convert it to safetensors.'
        )
    if last > member.size or member.header_offset + 30 + member.size > end:
        raise SourceReadError(
            f'{where}: {what} needs bytes {first}..{last} of the zip member {member.name!r}, '
            f'which holds {member.size} bytes: the file is truncated or damaged.'
        )


def _gather(opened: list[dict[KeyPath, _Part]], where: str) -> dict[KeyPath, _Layout]:
    """Model-parallel parts joined along the axes Llama's reference code split them on."""
    layouts: dict[KeyPath, _Layout] = {}
    keys = list(dict.fromkeys(k for parts in opened for k in parts))
    for key in keys:
        parts = tuple(p[key] for p in opened if key in p)
        name = key_to_name(key)
        shapes = [p.tensor.shape for p in parts]
        if len(parts) == 1:
            layouts[key] = _Layout(parts)
            continue
        rules = [axis for pattern, axis in LLAMA_SPLIT_AXES if re.fullmatch(pattern, name)]
        if not rules:
            raise SourceReadError(
                f'{where}: {name!r} is in {len(parts)} consolidated files (shapes {shapes}), and '
                'how model-parallel files split a tensor is known only for the names of '
                f"Llama's reference code (split axis in brackets): {_SUPPORTED}. Open a single "
                'consolidated.NN.pth file to read its part as stored.'
            )
        if len(parts) != len(opened):
            raise SourceReadError(
                f'{where}: {name!r} is in {len(parts)} of the {len(opened)} consolidated files.'
            )
        if rules[0] is None:
            if len(set(shapes)) > 1:
                raise SourceReadError(
                    f'{where}: {name!r} should be the same in every consolidated file, but its '
                    f'shapes are {shapes}.'
                )
            layouts[key] = _Layout(parts[:1])
            continue
        axis = rules[0]
        others = {s[:axis] + s[axis + 1 :] for s in shapes}
        dtypes = {p.tensor.dtype for p in parts}
        if any(len(s) <= axis for s in shapes) or len(others) > 1 or len(dtypes) > 1:
            raise SourceReadError(
                f'{where}: {name!r} cannot be joined along axis {axis} across the consolidated '
                f'files: their shapes are {shapes}, dtypes {sorted(d.name for d in dtypes)}.'
            )
        layouts[key] = _Layout(parts, axis)
    return layouts
