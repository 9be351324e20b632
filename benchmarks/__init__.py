"""Benchmarks of IrisSegment, each run from the repository root as `python -m benchmarks.<name>` (accuracy, speed,
memory, batch, registration, ablations); the code they share is in `benchmarks.common`."""
