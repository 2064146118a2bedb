"""Rules: the edits users write, turning the checkpoint's tree into the target tree.

Imports `arrays`; nothing here reads or plans.
"""
