"""Serving helpers that service.py builds on, torch-free and importable without a server or a model.

``serving.requests``: parsing and validating ``predict`` / ``predict_batch`` requests (pure functions);
``serving.batcher``: the in-process micro-batcher that merges concurrent requests into one ONNX Runtime run.
"""
