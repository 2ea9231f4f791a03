"""Linepack trainer: consumer, model, training loop, diagnostics."""
