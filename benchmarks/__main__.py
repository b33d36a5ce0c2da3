"""``python -m benchmarks [--quick] [--json PATH] [--database-url URL | --backend mariadb]``.

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

from .harness import family
from .report import render
from .suite import DEFAULT_DATABASE_URL, DEFAULT_URLS, run_async
from .suite import SYSTEMS as SYSTEMS_BY_FAMILY

SYSTEMS = SYSTEMS_BY_FAMILY["postgresql"]
BACKEND_FAMILY = {"postgresql": "postgresql", "mariadb": "mysql"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark routemq-outbox against PgQueuer, procrastinate and raw SQL "
        "on PostgreSQL, or against raw SQL on MariaDB.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (2,000 jobs); under 2 minutes"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number here")
    parser.add_argument(
        "--database-url",
        help="maintenance database of the server to use; throwaway databases are created "
        "and dropped beside it; postgresql:// or mysql:// (MariaDB) decides the family "
        f"(default: {DEFAULT_DATABASE_URL}, or {DEFAULT_URLS['mariadb']} with "
        "--backend mariadb)",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKEND_FAMILY),
        help="the server family, when --database-url is not given (default: postgresql); "
        "on MariaDB only routemq and raw run",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SYSTEMS,
        help="measure only these systems (ratios to the others are then n/a; "
        "default: every system the server can run)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the child processes' output files"
    )
    return parser


def _target(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str, tuple[str, ...]]:
    """The server URL and the systems to measure, from --database-url, --backend and --only."""
    url = args.database_url or DEFAULT_URLS[args.backend or "postgresql"]
    try:
        url_family = family(url)
    except Exception as exc:
        parser.error(f"--database-url: {exc}")
    if args.backend and BACKEND_FAMILY[args.backend] != url_family:
        parser.error(f"--backend {args.backend} does not match the URL {url.split('@')[-1]}")
    available = SYSTEMS_BY_FAMILY[url_family]
    if args.only is None:
        return url, available
    unsupported = [s for s in args.only if s not in available]
    if unsupported:
        parser.error(
            f"{', '.join(unsupported)} run on PostgreSQL only; on MariaDB choose among "
            f"{', '.join(available)}"
        )
    return url, tuple(s for s in available if s in args.only)


def main() -> int:
    parser = _parser()
    args = parser.parse_args()
    database_url, systems = _target(parser, args)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        results = asyncio.run(
            run_async(
                quick=args.quick,
                database_url=database_url,
                systems=systems,
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
