"""One-off diagnosis scripts of issue #20, kept as run; outputs in benchmarks/results/knowledge-diagnosis.md."""
