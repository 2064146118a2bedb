"""Sources of stored arrays: Orbax items, safetensors files, live trees, each read by region.

Imports `arrays`; the only stage that opens checkpoints for reading.
"""
