"""``make bench``: Airlock measured against the unsafe in-process baseline (issue 3).

``python -m bench.run [--quick] [--out bench-results/latest.json]`` runs every scenario, prints
one table and writes the figures, the machine and every raw sample as JSON. ``bench.baseline``
is the only place where the benchmark loads a model: see the warning there."""
