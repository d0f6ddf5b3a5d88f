"""Benchmarks of dpspeed (scripts; a package so that `python -m benchmarks.NAME` finds these, not another library's `benchmarks`)."""
