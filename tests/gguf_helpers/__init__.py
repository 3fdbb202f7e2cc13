"""Helpers for the GGUF tests: synthetic GGUF files, a scalar dequantisation oracle, generated texts."""
