"""``python -m benchmarks [--quick] [--json PATH] [--database-url URL]``.

Exits 0 when every measurement produced a sane number (targets may still be missed: they are
reported, not asserted), 1 when any is missing or impossible, 130 on Ctrl-C, 143 on
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path

from .report import render
from .suite import DEFAULT_DATABASE_URL, run_async

SYSTEMS = ("routemq", "raw", "pgqueuer", "procrastinate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark routemq-outbox against PgQueuer, procrastinate and raw SQL.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (2,000 jobs); under 2 minutes"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number here")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="maintenance database of the server to use; throwaway databases are created "
        f"and dropped beside it (default: {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SYSTEMS,
        default=list(SYSTEMS),
        help="measure only these systems (ratios to the others are then n/a)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the child processes' output files"
    )
    return parser


def main() -> int:
    args = _parser().parse_args()
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        results = asyncio.run(
            run_async(
                quick=args.quick,
                database_url=args.database_url,
                systems=tuple(s for s in SYSTEMS if s in args.only),
                progress=progress,
                keep_logs=args.keep_logs,
            )
        )
    except KeyboardInterrupt:
        print("interrupted; everything the run started was stopped and dropped", file=sys.stderr)
        return 130
    except Exception as exc:
        traceback.print_exc()
        print(
            f"benchmark run failed: {type(exc).__name__}: {exc}; everything it started was "
            "stopped and dropped",
            file=sys.stderr,
        )
        return 1
    except asyncio.CancelledError:
        # SIGTERM cancels the run (see suite.run_async); clean-up has already happened.
        print("terminated; everything the run started was stopped and dropped", file=sys.stderr)
        return 143
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
