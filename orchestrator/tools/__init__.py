"""Benchmarks, experiments, reports and the TRL baseline: built on the core, never imported by it."""
