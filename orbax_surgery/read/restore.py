"""Restoring and planning outside a `CheckpointManager`, from any source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from orbax_surgery.keys import PyTree
from orbax_surgery.plan.plan import Plan
from orbax_surgery.plan.resolve import checked_rules, resolve
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES, materialize
from orbax_surgery.read.verify import verified
from orbax_surgery.rules.rule import Rule
from orbax_surgery.sources.open import open_source
from orbax_surgery.sources.source import ArraySource


def restore(
    source: epath.PathLike | ArraySource,
    target: PyTree = None,
    rules: Sequence[Rule] | Mapping[str, Any] = (),
    *,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    verify: bool = False,
) -> PyTree:
    """Restores `target` from any source, outside a `CheckpointManager`.

    `source` is an Orbax checkpoint item directory, a Hugging Face safetensors
    file or directory (sharded with its index), or a source object. Each host
    reads only what its shards need. With `verify=True`, every block read is
    checked against the checksums a save or export with `checksums=True` recorded.

    Example:
        >>> import tempfile, jax, numpy as np
        >>> from orbax_surgery import Rename, Transpose
        >>> from orbax_surgery.huggingface.safetensors_file import write_file
        >>> path = tempfile.mkdtemp() + '/model.safetensors'
        >>> write_file(path, {'proj.weight': np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> out = restore(path, {'proj': {'kernel': ...}},
        ...               [Rename('proj/weight', 'proj/kernel'), Transpose('proj/kernel', (1, 0))])
        >>> kernel = out['proj']['kernel']
        >>> isinstance(kernel, jax.Array), kernel.dtype.name, kernel.tolist()
        (True, 'float32', [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])
    """
    opened = open_source(source)
    if verify:
        opened = verified(opened)
    plan = resolve(opened.arrays, target, checked_rules(rules))
    return materialize(plan, opened, max_inflight_bytes=max_inflight_bytes)


def plan_restore(
    directory: epath.PathLike | ArraySource,
    target: PyTree = None,
    rules: Sequence[Rule] | Mapping[str, Any] = (),
) -> Plan:
    """Plans restoring the checkpoint at `directory`, reading no array data.

    `directory` is an Orbax checkpoint item, or Hugging Face safetensors (a
    file, or a directory with `model.safetensors` or its sharded index).

    Print the plan to see where each target leaf comes from, what is unused,
    which leaves are not lazy and how many bytes each process will read.

    Example:
        >>> import tempfile, jax, numpy as np, orbax.checkpoint as ocp
        >>> from orbax_surgery import Drop
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(path, {'w': np.ones((4, 8), np.float32), 'opt': np.zeros(3)})
        >>> target = {'w': jax.ShapeDtypeStruct((4, 8), np.float32)}
        >>> plan = plan_restore(path, target, [Drop('opt')])
        >>> plan.errors, plan.steps[0].sources, plan.reads[0].needed
        ((), ('w',), 128)
    """
    return resolve(open_source(directory).arrays, target, rules)
