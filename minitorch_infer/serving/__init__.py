"""Serving over HTTP: the OpenAI-compatible API (FastAPI on uvicorn) in front of the batched engine, with
Prometheus metrics."""
