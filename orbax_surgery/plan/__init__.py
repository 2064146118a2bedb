"""The plan: rules resolved against a checkpoint's metadata, with every error and byte count.

Imports `rules` and `arrays`; pure, no I/O.
"""
