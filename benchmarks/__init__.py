"""lorascope benchmarks.

``python -m benchmarks`` measures the analysis kernels and whole-model runs (issue 5) and rewrites
the analysis section of BENCHMARKS.md; ``python benchmarks/train_step.py`` owns the training
section. See ``python -m benchmarks --help``.
"""
