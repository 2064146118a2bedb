"""Arrays without I/O: regions of arrays, lazy expressions over stored arrays, and the
user functions a plan calls.

The lowest stage: it imports only `errors` and `keys`.
"""
