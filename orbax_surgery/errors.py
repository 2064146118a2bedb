"""The exceptions a user can cause, all rooted at `SurgeryError`."""

from __future__ import annotations


class SurgeryError(ValueError):
    """Base class: the rules, target or checkpoint cannot give the target tree."""


class RuleError(SurgeryError):
    """A rule is malformed: a bad regex, template, dtype, axis or shape."""


class UnmatchedKeyError(SurgeryError):
    """A key that a rule or the target needs is not there."""


class UnusedKeyError(SurgeryError):
    """Checkpoint keys that no target reads, and that no rule dropped."""


class AmbiguousRuleError(SurgeryError):
    """Two rules or two keys claim the same target key."""


class ShapeMismatchError(SurgeryError):
    """A shape does not fit: target vs. source, or an op's input."""


class DtypeMismatchError(SurgeryError):
    """A dtype differs from the target's, or cannot be cast."""


class CheckpointNotFoundError(SurgeryError, FileNotFoundError):
    """The directory is missing, unfinalized, or not an Orbax PyTree item."""


class SourceReadError(SurgeryError):
    """Reading array data failed: a truncated, missing or unreadable chunk."""


class UnfinalizedCheckpointError(CheckpointNotFoundError):
    """The checkpoint was never finalized: its save was interrupted or is running."""


class LoraMismatchError(SurgeryError):
    """Adapters disagree with their spec: another rank, alpha, target or shape."""


class DestinationExistsError(SurgeryError, FileExistsError):
    """An export's destination exists, and `overwrite=True` was not given."""
