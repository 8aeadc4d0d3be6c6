"""Commands around the method: the benchmark and GPU check (bench.py), the memory self-check (memory_check.py),
the ablation table (ablate.py), and the sparse-reward analysis (sparsity.py). Run them as `python -m tools.bench`."""
