"""Write the golden models to disk.

    python golden_models/build.py [NAMES...] [--out DIR]
    python -m golden_models.build [NAMES...] [--out DIR]

Default output directory: the golden_models package folder itself.
With no NAMES: the small models; real-size ones (resnet18, mobilenetv2,
efficientnet_b0, vit_tiny, bert_small, gpt2_small) only when named.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    from golden_models import DEFAULT_OUT_DIR, MODEL_NAMES, REAL_SIZE_NAMES, build_all
else:
    from . import DEFAULT_OUT_DIR, MODEL_NAMES, REAL_SIZE_NAMES, build_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to build (default: all of {', '.join(MODEL_NAMES)}; "
                             f"real-size, only by name: {', '.join(REAL_SIZE_NAMES)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR,
                        help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    known = MODEL_NAMES + REAL_SIZE_NAMES
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(known)}")
    for path in build_all(args.out, args.names or None):
        print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
