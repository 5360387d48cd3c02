"""``make bench``: run every ``benchmarks/bench_*.py`` ``main()`` in turn and print its table.

A benchmark that fails is reported and the others still run; the exit status is 1 if any
failed.

    python -m benchmarks.run                 # all
    python -m benchmarks.run batch read      # only bench_batch.py and bench_read.py
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path


def discover() -> list[str]:
    """Module names of the benchmarks, sorted."""
    here = Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = discover()
    if argv:
        names = [n for n in names if n.removeprefix("bench_") in argv or n in argv]
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        saved = sys.argv
        sys.argv = [f"benchmarks/{name}.py"]  # each main() parses its own (default) options
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            status = module.main()
            if status:
                failed.append(name)
        except SystemExit as exc:
            if exc.code:
                failed.append(name)
        except Exception:  # noqa: BLE001 - report and go on with the next benchmark
            traceback.print_exc()
            failed.append(name)
        finally:
            sys.argv = saved
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
