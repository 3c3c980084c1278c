"""Built-in passes, grouped by family in subpackages (cleanup/, fold/, fuse/, ...). Every module
of this package and of its subpackages is imported here (names starting with "_" excepted), and
its passes register themselves by decorator: a new pass only needs a new module, and a new family
only a new folder with an ``__init__.py``."""

import importlib
import pkgutil


def _import_all(path, prefix: str) -> None:
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{prefix}.{info.name}")
        if info.ispkg:
            _import_all(module.__path__, module.__name__)


_import_all(__path__, __name__)
