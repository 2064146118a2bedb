"""Reading: a plan turned into arrays, each stored chunk read once per host, checked if asked.

Imports `plan`, `sources` and below.
"""
