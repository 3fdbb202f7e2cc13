"""Test oracle for minitorch-infer: a plain NumPy Llama-family model (llama_numpy) and tiny random
HF-format models (tiny_models). Shares no code with the package.

Tests import it as `from oracle import llama_numpy, tiny_models`: pytest puts tests/ on sys.path (there is
no tests/__init__.py), the same way tests import conftest.
"""
