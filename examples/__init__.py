"""Runnable calmrun examples (importable from the repository root)."""
