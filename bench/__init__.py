"""calmrun benchmarks on a real local broker: ``python -m bench [--quick] [--only NAME]`` (``make bench``).

Every workload warms up, measures several rounds and reports the median and spread of each metric; the
results go to ``bench/results/results.json`` and ``bench/results/results.md``. Nothing here is part of the
test suite's timing: ``tests/deploy/test_bench_smoke.py`` only checks that every workload still runs.
"""
