"""What service.py builds on: request limits and parsing, image decoding, the micro-batcher and the
HTTP edge, torch-free and importable without a server or a model (docs/ARCHITECTURE.md lists them)."""
