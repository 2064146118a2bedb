"""The exceptions a user can cause, all rooted at `SurgeryError`."""

from __future__ import annotations


class SurgeryError(ValueError):
    """Base class: the rules, target or checkpoint cannot give the target tree.

    Catch it to handle every error of this package; it is a `ValueError`. A
    plan's errors also carry `suggestions` (fixes, best first, e.g. a rule to
    add) and `consequences` (the errors that follow from this one, folded under
    it: fix this one and they go away).

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> try:
        ...     osurg.apply_rules({'w': np.ones(2)}, {'w': np.zeros(3)})
        ... except osurg.SurgeryError as e:
        ...     print(type(e).__name__)
        ShapeMismatchError
    """

    suggestions: tuple[str, ...] = ()
    consequences: tuple[SurgeryError, ...] = ()

    def with_details(
        self,
        more: str = '',
        *,
        before: str = '',
        suggestions: tuple[str, ...] | None = None,
        consequences: tuple[SurgeryError, ...] = (),
    ) -> SurgeryError:
        """A copy of this error, `before` and `more` around its message, and its details set."""
        copy = type(self).__new__(type(self))
        ValueError.__init__(copy, f'{before}{self}{more}')
        copy.suggestions = self.suggestions if suggestions is None else suggestions
        copy.consequences = (*self.consequences, *consequences)
        for note in getattr(self, '__notes__', ()):
            copy.add_note(note)
        return copy


class RuleError(SurgeryError):
    """A rule is malformed: a bad regex, template, dtype, axis or shape.

    Raised when the rule is built, before anything is planned or read.

    Example:
        >>> import orbax_surgery as osurg
        >>> osurg.Cast('w', 'bfloat17')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.RuleError: Cast(...): 'bfloat17' is not a dtype. Did you mean ...?
    """


class UnmatchedKeyError(SurgeryError):
    """A key that a rule or the target needs is not there.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> osurg.apply_rules({'dense/w': np.ones(2)}, {'Dense/w': ...})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.UnmatchedKeyError: Nothing fills target 'Dense/w': ... 'dense/w'. ...
    """


class UnusedKeyError(SurgeryError):
    """Checkpoint keys that no target reads, and that no rule dropped.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> osurg.apply_rules({'w': np.ones(2), 'opt': np.ones(2)}, {'w': ...})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.UnusedKeyError: 1 checkpoint key ... add Drop('opt') as the first ...
    """


class AmbiguousRuleError(SurgeryError):
    """Two rules or two keys claim the same target key.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> tree = {'a': np.ones(2), 'b': np.ones(2)}
        >>> osurg.apply_rules(tree, None, [osurg.Rename('a|b', 'w')])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.AmbiguousRuleError: Rename(...) maps 'b' to 'w', which 'a' ...
    """


class ShapeMismatchError(SurgeryError):
    """A shape does not fit: target vs. source, or an op's input.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> osurg.apply_rules({'w': np.ones(2)}, {'w': np.zeros(3)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.ShapeMismatchError: Target 'w' has shape (3,), but 'w' gives (2,)...
    """


class DtypeMismatchError(SurgeryError):
    """A dtype differs from the target's, or cannot be cast.

    Nothing is cast unless a `Cast` rule says so.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> osurg.apply_rules({'w': np.ones(2)}, {'w': np.zeros(2, np.float32)})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.DtypeMismatchError: Target 'w' has dtype float32, ... float64. Cast...
    """


class CheckpointNotFoundError(SurgeryError, FileNotFoundError):
    """The directory is missing, unfinalized, or not an Orbax PyTree item.

    Also a `FileNotFoundError`.

    Example:
        >>> import orbax_surgery as osurg
        >>> osurg.plan_restore('/no/such/checkpoint')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.CheckpointNotFoundError: No checkpoint at /no/such/checkpoint: ...
    """


class SourceReadError(SurgeryError):
    """Reading array data failed: a truncated, missing or unreadable chunk.

    Example:
        >>> import os, tempfile, numpy as np, orbax_surgery as osurg
        >>> from orbax_surgery.huggingface.safetensors_file import write_file
        >>> path = tempfile.mkdtemp() + '/model.safetensors'
        >>> write_file(path, {'w': np.ones(4, np.float32)})
        >>> os.truncate(path, os.path.getsize(path) - 4)  # Cut short, as by a failed copy.
        >>> osurg.SafetensorsCheckpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.SourceReadError: ...model.safetensors is truncated: 'w' needs ...
    """


class UnfinalizedCheckpointError(CheckpointNotFoundError):
    """The checkpoint was never finalized: its save was interrupted or is running.

    Example:
        >>> import orbax_surgery as osurg
        >>> osurg.plan_restore('/ckpts/7.orbax-checkpoint-tmp-1700000000/default')
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.UnfinalizedCheckpointError: ... is a temporary directory: its save ...
    """


class LoraMismatchError(SurgeryError):
    """Adapters disagree with their spec: another rank, alpha, target or shape.

    Also raised for an adapter checkpoint that `LoraSave` did not write.

    Example:
        >>> import tempfile, numpy as np, orbax.checkpoint as ocp, orbax_surgery as osurg
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(path, {'w': np.ones(2)})
        >>> osurg.read_lora_layout(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.LoraMismatchError: ... holds no LoRA layout in its metadata: ...
    """


class DestinationExistsError(SurgeryError, FileExistsError):
    """An export's destination exists, and `overwrite=True` was not given.

    Also a `FileExistsError`.

    Example:
        >>> import tempfile, numpy as np, orbax_surgery as osurg
        >>> osurg.save_safetensors({'w': np.ones(2)}, tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.DestinationExistsError: ... exists; the export leaves it untouched. ...
    """


class ChecksumMismatchError(SourceReadError):
    """Stored data differs from the checksums recorded when it was saved.

    Raised by a verified restore (`verify=True`) of a checkpoint saved with
    `checksums=True`: it names the checkpoint, the key, the block and its region.

    Example:
        >>> import tempfile, numpy as np, orbax.checkpoint as ocp, orbax_surgery as osurg
        >>> from orbax_surgery.read.checksum_records import CHECKSUMS_DIR
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.Checkpointer(osurg.SurgeryCheckpointHandler(use_ocdbt=False)) as ckptr:
        ...     ckptr.save(path, args=osurg.SurgerySave(item={'w': np.ones(4)}, checksums=True))
        >>> with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
        ...     ckptr.save(path + '2', {'w': np.zeros(4)})  # Same layout, other values.
        >>> import shutil
        >>> _ = shutil.copytree(f'{path}/{CHECKSUMS_DIR}', f'{path}2/{CHECKSUMS_DIR}')
        >>> osurg.restore(path + '2', verify=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.ChecksumMismatchError: ...2: 'w' block (0,) [0:4] does not match ...
    """


class PeerTimeoutError(SurgeryError, TimeoutError):
    """Another process of a multi-process job did not reach a barrier in time.

    It died, hangs or is far behind. The message names the barrier, the
    processes, the timeout, and what the operation left on disk. Also a
    `TimeoutError`.

    Example:
        >>> from orbax_surgery.write.barrier import Barrier
        >>> barrier = Barrier('orbax_surgery.export', call=1, timeout_secs=5, process=0, count=2)
        >>> raise barrier.timed_out('written', 5.0, 'DEADLINE_EXCEEDED: ...', 'Nothing written.')
        ... # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        orbax_surgery.errors.PeerTimeoutError: Process 0 gave up after 5.0 s (timeout 5 s) at
        barrier 'orbax_surgery.export.1.written': not all of processes [0, 1] reached it.
        Nothing written. The coordination service said: DEADLINE_EXCEEDED: ...
    """
