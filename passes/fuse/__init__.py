"""Fusions: a subgraph replaced by one op or fewer ops (fuse-conv-bn, fuse-gelu, ...), written as
patterns over the pattern engine (infoptc.pattern)."""
