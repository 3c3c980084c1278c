"""Cleanup passes: graph surgery that never changes a number (dce, cse, dedup-initializers,
eliminate-noops, toposort)."""
