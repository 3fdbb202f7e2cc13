"""Helpers for the loader fuzzers: the contract every case is held to, and mutation strategies."""
