"""Built-in targets, one module per target; each registers itself on import. Modules must
import heavy optional packages (TVM, TensorRT) lazily, inside methods, so that listing
targets stays fast and works where those packages are absent."""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")
