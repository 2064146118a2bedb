"""Byte sizes: printed in binary units, parsed from what users write (`512M`, `5GB`)."""

from __future__ import annotations

import re

# Bare K/M/G/T are binary, as in `ls -h`; KB/MB/GB/TB decimal, as in Hugging Face's
# `max_shard_size='5GB'`; KiB/MiB/GiB/TiB binary.
_UNITS = {'': 1, 'B': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
_UNITS |= {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12}
_UNITS |= {'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}


def format_bytes(n: int) -> str:
    """Bytes in binary units.

    Example:
        >>> format_bytes(1536), format_bytes(3 * 2**30)
        ('1.5 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if size < 1024 or unit == 'TiB':
            return f'{int(size)} B' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024
    raise AssertionError('unreachable')


def parse_bytes(text: str) -> int | None:
    """A positive size from bytes with an optional unit, or None if it is not one.

    Example:
        >>> parse_bytes('512M'), parse_bytes('5GB'), parse_bytes('1.5 KiB'), parse_bytes('5 apples')
        (536870912, 5000000000, 1536, None)
    """
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', text)
    unit = _UNITS.get(match[2].upper()) if match else None
    if match is None or unit is None or float(match[1]) <= 0:
        return None
    return int(float(match[1]) * unit)
