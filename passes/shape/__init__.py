"""Passes on the model's shapes and signature (make-batch-dynamic)."""
