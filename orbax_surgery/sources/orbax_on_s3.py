"""Orbax checkpoints on s3://, which Orbax 0.12.8 itself cannot address.

Orbax builds a TensorStore `gcs` spec for gs:// paths but sends every other
path to the `file` driver (`s3://b/x` becomes the relative path `s3:/b/x`),
and finalizes by renaming a directory, which object storage cannot do.
`allow()`, run when this package is imported, wraps four of Orbax's private
functions so that s3:// is treated as gs:// is: array paths get TensorStore's
`s3` driver (`orbax_surgery.locations.kvstore`: the AWS credential chain,
`AWS_ENDPOINT_URL`, `AWS_REGION`), and a checkpoint is finalized by a commit
file (`CommitFileTemporaryPath`, what Orbax uses on GCS) unless options choose
otherwise. Every other path gets Orbax's own answer, and no file of Orbax's is
edited. `disallow()` undoes it. Metadata files go through `etils.epath`, which
needs `s3fs` (`pip install orbax-surgery[s3]`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from orbax_surgery import locations

_WRAPPED = '_orbax_surgery_original'
_PATCHES: list[tuple[Any, str]] = [
    (tensorstore_utils, '_normalize_path'),
    (tensorstore_utils, '_use_gcs_driver'),
    (gcs_utils, 'get_kvstore_for_gcs'),
    (atomicity_defaults, 'get_item_default_temporary_path_class'),
    (atomicity_defaults, 'get_default_temporary_path_class'),
]


def allow() -> bool:
    """Lets Orbax read and write s3:// checkpoints; False if Orbax moved what is wrapped.

    Example:
        >>> tensorstore_utils._use_gcs_driver('s3://ckpts/run')
        True
    """
    if not all(callable(getattr(module, name, None)) for module, name in _PATCHES):
        return False
    for (module, name), make in zip(_PATCHES, _WRAPPERS, strict=True):
        original = getattr(module, name)
        if not hasattr(original, _WRAPPED):
            wrapper = functools.wraps(original)(make(original))
            setattr(wrapper, _WRAPPED, original)
            setattr(module, name, wrapper)
    return True


def disallow() -> None:
    """Puts Orbax's own functions back: s3:// paths then fail in Orbax as before."""
    for module, name in _PATCHES:
        original = getattr(getattr(module, name), _WRAPPED, None)
        if original is not None:
            setattr(module, name, original)


def _is_s3(path: Any) -> bool:
    return str(path).startswith('s3://')


def _normalize_path(original: Callable[[str], str]) -> Callable[[str], str]:
    return lambda path: locations.absolute(path) if _is_s3(path) else original(path)


def _use_gcs_driver(original: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda directory: _is_s3(directory) or original(directory)


def _kvstore(original: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    def kvstore(path: str) -> dict[str, Any]:
        if not _is_s3(path):
            return original(path)
        spec = locations.kvstore(path)
        spec['path'] = spec['path'].rstrip('/')  # Orbax's gcs spec has no trailing '/'.
        return spec

    return kvstore


def _temporary_path_class(original: Callable[..., Any]) -> Callable[..., Any]:
    def temporary_path_class(path: Any, *, atomicity_options: Any = None) -> Any:
        if _is_s3(path) and atomicity_options is None:
            return atomicity.CommitFileTemporaryPath  # Object stores cannot rename.
        return original(path, atomicity_options=atomicity_options)

    return temporary_path_class


_WRAPPERS: list[Callable[[Any], Callable[..., Any]]] = [
    _normalize_path,
    _use_gcs_driver,
    _kvstore,
    _temporary_path_class,
    _temporary_path_class,
]
