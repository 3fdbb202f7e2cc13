"""Backends: `numpy` (the fast executor) and `reference` (the plain interpreter used as the oracle)."""
