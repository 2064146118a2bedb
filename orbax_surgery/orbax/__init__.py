"""The Orbax integration: the handler and its `CheckpointArgs`, what Orbax users import.

Imports `write` and below.
"""
