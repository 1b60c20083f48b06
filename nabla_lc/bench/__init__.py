"""Benchmark tasks, grading and the runner."""
