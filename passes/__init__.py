"""Built-in passes, one module per pass family. Every module in this package is imported
here, and its passes register themselves by decorator; a new pass only needs a new module."""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")
