"""Benchmarks of avme: training, sampling, IWAE evaluation, memory and roofline (see bench/README.md).

Run ``python bench/run.py`` (all workloads) and ``python bench/report.py bench/results/<file>.json``.
"""
