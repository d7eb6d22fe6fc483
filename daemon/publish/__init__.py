"""Publish: a promoted adapter into a registered Ollama model.

Owns export planning and the converter set-up (``export``), the Ollama HTTP adapter (``ollama``, the only HTTP
client) and the model registry (``registry``: versions, ``latest``, retention, rollback).
May import: ``daemon.train`` (templates, the runner's job records) and the leaves.
"""
