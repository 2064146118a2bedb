"""Writing: surgery on save, checksum records, atomic moves and bounded barriers.

Imports `read` and below.
"""
