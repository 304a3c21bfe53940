"""Benchmarks for hmt-qa: each is ``python -m bench.<name> [--quick]``; results go to ``bench/results/``.

These are plain scripts, not pytest: they print a table and write JSON with the machine they ran on.
"""
