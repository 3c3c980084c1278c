"""Built-in passes. Each module registers its passes on import; one module per pass family."""

from . import dce, eliminate_noops, toposort  # noqa: F401
