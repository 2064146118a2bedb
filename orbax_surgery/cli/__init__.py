"""The `orbax-surgery` command line: inspect, plan, convert, rules files and the demo.

The top stage: it may import every other.
"""
