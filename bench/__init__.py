"""The benchmark harness: run specs, the training engine, timing, MLflow tracking, the CLI.

``bench`` depends on ``methods`` and ``tasks``; neither depends on it.
"""
