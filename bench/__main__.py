"""`python -m bench stream|batch [options]`."""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("stream", "batch", "dashboard", "quota", "floor"):
        sys.exit("usage: python -m bench stream|batch|dashboard|quota|floor [options]")
    module = importlib.import_module(f"bench.{sys.argv[1]}")
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
