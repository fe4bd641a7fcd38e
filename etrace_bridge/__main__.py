"""`python -m etrace_bridge`: the same as the `etrace-compare` command."""

from etrace_bridge.compare.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
