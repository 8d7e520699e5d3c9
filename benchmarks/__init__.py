"""The benchmarks: each module is a script run from the repository root as
``python -m benchmarks.NAME``; ``benchmarks/common.py`` holds what they share."""
