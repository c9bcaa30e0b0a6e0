"""calmrun's peers on the same workload: ``python -m bench --peers`` (``make bench-peers``).

Restate (its server from npm, its Python SDK) and DBOS (on PostgreSQL) run the three-step no-op workflow
of ``bench.workflow.throughput`` right after calmrun's own measurement, in the same ``python -m bench``
run, so the ratios in the table come from one session on one machine. ``compare`` orchestrates (calmrun's
venv); ``install`` puts the peers in ``.calmrun/peers/``; ``loadgen``, ``restate_app``, ``restate_load``
and ``dbos_load`` run in the peers' own venv and import nothing of calmrun.
"""
