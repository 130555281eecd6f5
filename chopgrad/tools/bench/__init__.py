"""Benchmark machinery: each configuration runs in a fresh subprocess so its peak memory is clean."""
from .runner import Measurement, run_isolated

__all__ = ["Measurement", "run_isolated"]
