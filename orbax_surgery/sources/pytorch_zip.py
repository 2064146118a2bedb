"""The zip archive `torch.save` writes: where each member's bytes lie, found by ranged reads.

Since torch 1.6 a checkpoint is a zip of uncompressed (stored) members:
`<prefix>/data.pkl`, the pickled tree, and `<prefix>/data/<key>`, one raw
storage each. A tensor is then a byte range of the file. Finding the members
takes the zip's end record (a suffix read: remote sizes are unknown), its
central directory (one read) and, per member read, its 30-byte local header:
torch pads that header's extra field to align the data, so the central
directory's extra length does not give the data's start.

Zip64 archives (over 4 GiB: the 7B-and-up consolidated files) are read alike.
"""

from __future__ import annotations

import dataclasses
import struct

from orbax_surgery import locations
from orbax_surgery.errors import CheckpointNotFoundError, SourceReadError
from orbax_surgery.sources.file_reads import ByteFile

_END = b'PK\x05\x06'
_END64 = b'PK\x06\x06'
_LOCATOR64 = b'PK\x06\x07'
_CENTRAL = b'PK\x01\x02'
_LOCAL = b'PK\x03\x04'
_END_SIZE = 22
_TAIL = 56 + 20 + _END_SIZE
"""Bytes at the end holding the end records of a zip64 archive without a comment."""
_MAX_COMMENT = 0xFFFF
_LOCAL_SIZE = 30
_SMALL_MEMBER_SLACK = 256
"""Bytes of local extra field guessed when a small member is read with its header at once."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of the archive, as its central directory lists it."""

    name: str
    header_offset: int
    """Where its local header starts."""
    size: int
    """Its stored bytes."""
    method: int
    """0 for stored; torch never compresses."""
    flags: int


@dataclasses.dataclass(frozen=True)
class Directory:
    """The members of an archive, by name, and where the central directory starts."""

    members: dict[str, Member]
    start: int


def read_directory(file: ByteFile) -> Directory:
    """The archive's members, from its end record and central directory.

    Raises:
        SourceReadError: It is not a zip archive (a legacy torch.save pickle
            is named as such), or its directory is damaged.
    """
    where = locations.shown(file.location)
    tail = _tail(file, _TAIL)
    at = tail.rfind(_END)
    if at < 0 or len(tail) - at - _END_SIZE != _comment_length(tail, at):
        tail = _tail(file, _TAIL + _MAX_COMMENT)  # A comment follows the end record.
        at = _find_end(tail)
    if at < 0:
        raise _not_a_zip(file)
    (_, _, _, _, count, size, start, _) = struct.unpack('<4s4H2LH', tail[at : at + _END_SIZE])
    locator = tail[at - 20 : at] if at >= 20 else b''
    if locator[:4] == _LOCATOR64:
        (_, _, end64, _) = struct.unpack('<4sLQL', locator)
        record = tail[at - 76 : at - 20] if at >= 76 else b''  # Where torch writes it.
        if record[:4] != _END64:
            record = file.read(end64, 56)
        if record[:4] != _END64:
            raise SourceReadError(f'{where}: its zip64 end record at byte {end64} is damaged.')
        (count, size, start) = struct.unpack('<QQQ', record[32:56])
    known = file.size()
    if known is not None and start + size > known:
        raise SourceReadError(
            f'{where}: its zip directory says it lies at bytes {start}..{start + size}, past the '
            f'end of the file ({known} bytes): the file is truncated or damaged.'
        )
    raw = file.read(start, size)
    members: dict[str, Member] = {}
    pos = 0
    for _ in range(count):
        if raw[pos : pos + 4] != _CENTRAL or len(raw) < pos + 46:
            raise SourceReadError(
                f'{where}: its zip central directory (bytes {start}..{start + size}) is damaged '
                f'at byte {start + pos}: truncated or not a PyTorch checkpoint.'
            )
        fields = struct.unpack('<4s6H3L5H2L', raw[pos : pos + 46])
        flags, method, packed, plain, n, m, k, offset = fields[3:5] + fields[8:13] + fields[16:]
        name = raw[pos + 46 : pos + 46 + n].decode('utf-8' if flags & 0x800 else 'cp437')
        extra = raw[pos + 46 + n : pos + 46 + n + m]
        packed, offset = _zip64_fields(extra, plain, packed, offset)
        if offset + _LOCAL_SIZE + n + packed > start:
            raise SourceReadError(
                f'{where}: its zip directory puts the member {name!r} at bytes {offset}..'
                f'{offset + packed} and more, past the directory at {start}: the file is damaged.'
            )
        members[name] = Member(name, offset, packed, method, flags)
        pos += 46 + n + m + k
    return Directory(members, start)


def data_start(file: ByteFile, member: Member) -> int:
    """Where `member`'s bytes start: read from its local header, whose extra field pads them."""
    header = file.read(member.header_offset, _LOCAL_SIZE)
    return member.header_offset + _local_length(file, member, header)


def read_member(file: ByteFile, directory: Directory, member: Member) -> bytes:
    """A small member's bytes, with its local header in the same request where it fits."""
    guess = _LOCAL_SIZE + len(member.name.encode()) + _SMALL_MEMBER_SLACK + member.size
    chunk = file.read(member.header_offset, min(guess, directory.start - member.header_offset))
    skip = _local_length(file, member, chunk[:_LOCAL_SIZE])
    if skip + member.size <= len(chunk):
        return chunk[skip : skip + member.size]
    return file.read(member.header_offset + skip, member.size)


def _local_length(file: ByteFile, member: Member, header: bytes) -> int:
    """The length of a local header and its name and extra field, checked."""
    if header[:4] != _LOCAL or len(header) < _LOCAL_SIZE:
        raise SourceReadError(
            f'{locations.shown(file.location)}: the zip member {member.name!r} has no local header '
            f'at byte {member.header_offset}: the file is damaged.'
        )
    n, m = struct.unpack('<HH', header[26:30])
    return _LOCAL_SIZE + n + m


def _zip64_fields(extra: bytes, plain: int, packed: int, offset: int) -> tuple[int, int]:
    """Sizes and offset past 4 GiB, from the zip64 extra field (in the order the format sets)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack('<HH', extra[pos : pos + 4])
        if tag == 1:
            body = extra[pos + 4 : pos + 4 + length // 8 * 8]
            values = iter(struct.unpack(f'<{len(body) // 8}Q', body))
            if plain == 0xFFFFFFFF:
                next(values, None)
            if packed == 0xFFFFFFFF:
                packed = next(values, packed)
            if offset == 0xFFFFFFFF:
                offset = next(values, offset)
            break
        pos += 4 + length
    return packed, offset


def _tail(file: ByteFile, n: int) -> bytes:
    """The last `n` bytes, or the whole file if shorter."""
    size = file.size()
    if size is not None:
        return file.read(max(0, size - n), min(n, size))
    try:
        return file.read(-n)  # A suffix range: a remote file's size is unknown.
    except CheckpointNotFoundError:
        raise
    except SourceReadError:
        return file.read(0)  # Shorter than `n` (or unreadable, which this says again).


def _comment_length(tail: bytes, at: int) -> int | None:
    return struct.unpack('<H', tail[at + 20 : at + 22])[0] if len(tail) >= at + 22 else None


def _find_end(tail: bytes) -> int:
    at = tail.rfind(_END)
    while at >= 0 and len(tail) - at - _END_SIZE != _comment_length(tail, at):
        at = tail.rfind(_END, 0, at)
    return at


def _not_a_zip(file: ByteFile) -> SourceReadError:
    where = locations.shown(file.location)
    try:
        head = file.read(0, 4)
    except (OSError, ValueError):
        head = b''  # Shorter than that.
    if not head:
        return SourceReadError(f'{where} is empty, not a PyTorch checkpoint.')
    if head[:1] == b'\x80':
        return SourceReadError(
            f'{where} is a legacy torch.save file (a bare pickle, written by torch < 1.6 or with '
            '_use_new_zipfile_serialization=False), whose tensors cannot be located without '
            'running its pickle. Re-save it with torch >= 1.6 (torch.save(torch.load(f), f)) '
            'or convert it to safetensors.'
        )
    if head == _LOCAL:
        return SourceReadError(
            f'{where} starts as a zip archive but has no end record: it is truncated (an '
            'interrupted copy or download?).'
        )
    return SourceReadError(
        f'{where} is not a PyTorch checkpoint: torch.save writes a zip archive, and this file '
        f'starts with {head!r}.'
    )
