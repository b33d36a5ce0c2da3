"""What the numbers say: ratios, the project's targets, and sanity checks of every result.

Targets are reported, never asserted: a run that misses one still succeeds. A run with a
missing or impossible number (no result, throughput <= 0, p50 > p99, jobs lost) does not:
``find_problems`` lists those, and the CLI exits non-zero when the list is not empty.

On MariaDB (``meta.family == "mysql"``) the targets that compare with PostgreSQL's peers, and
the NOTIFY latency, have no value (n/a); dispatch has one variant of ours, ``ours``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FLAT_RSS_TOLERANCE", "dispatch_variants", "evaluate_targets", "find_problems"]

# "Flat" RSS: the large backlog may cost at most this much more peak memory than the small one
# (the larger of 10 MiB and 10 %), i.e. memory does not grow with the backlog.
FLAT_RSS_TOLERANCE = (10.0, 0.10)


def _get(results: dict[str, Any], *path: str) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _ratio(top: Any, bottom: Any) -> float | None:
    a, b = _number(top), _number(bottom)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _family(results: dict[str, Any]) -> str:
    return str(results["meta"].get("family", "postgresql"))


def dispatch_variants(results: dict[str, Any]) -> tuple[str, ...]:
    """Our dispatch variants (without the baseline) that a run of this family measures."""
    return ("ours",) if _family(results) == "mysql" else ("ours_notify", "ours_no_notify")


def _sizes(results: dict[str, Any]) -> tuple[str, str, str, str]:
    sizes = results["meta"]["sizes"]
    return (
        str(sizes["claim_small"]),
        str(sizes["claim_large"]),
        str(sizes["rss_small"]),
        str(sizes["rss_large"]),
    )


def evaluate_targets(results: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Derived ratios and the target table (name, value, threshold, holds)."""
    drain = lambda system: _get(results, "drain", system, "jobs_per_s")  # noqa: E731
    enqueue = lambda system: _get(results, "bulk_enqueue", system, "jobs_per_s")  # noqa: E731
    tps = results.get("dispatch", {}).get("median_tps", {})
    claim_small, claim_large, rss_small, rss_large = _sizes(results)

    ratios: dict[str, Any] = {
        "drain_ours_over_pgqueuer": _ratio(drain("routemq"), drain("pgqueuer")),
        "drain_ours_over_procrastinate": _ratio(drain("routemq"), drain("procrastinate")),
        "drain_ours_over_raw_ceiling": _ratio(drain("routemq"), drain("raw_ceiling")),
        # The CLI with its default flags against the in-process drain and the ceiling: how
        # much of the in-process rate a user running `routemq-outbox work` gets.
        "drain_cli_over_in_process": _ratio(drain("routemq_cli"), drain("routemq")),
        "drain_cli_over_raw_ceiling": _ratio(drain("routemq_cli"), drain("raw_ceiling")),
        "enqueue_ours_over_pgqueuer": _ratio(enqueue("routemq"), enqueue("pgqueuer")),
        "enqueue_ours_over_procrastinate": _ratio(enqueue("routemq"), enqueue("procrastinate")),
        "claim_large_over_small": _ratio(
            _get(results, "claim", claim_large, "median_ms"),
            _get(results, "claim", claim_small, "median_ms"),
        ),
        "rss_large_over_small": _ratio(
            _get(results, "rss", rss_large, "peak_mib"), _get(results, "rss", rss_small, "peak_mib")
        ),
    }
    # Dispatch overhead: extra time per business transaction compared with the raw INSERT
    # (raw throughput / ours - 1), at each connection count, NOTIFY on and off (PostgreSQL).
    for connections, per_variant in tps.items():
        for variant in dispatch_variants(results):
            ratio = _ratio(per_variant.get("raw_insert"), per_variant.get(variant))
            ratios[f"dispatch_overhead_{variant}_{connections}conn"] = (
                None if ratio is None else ratio - 1
            )

    rss_peak_large = _number(_get(results, "rss", rss_large, "peak_mib"))
    rss_peak_small = _number(_get(results, "rss", rss_small, "peak_mib"))
    flat_limit = None
    if rss_peak_small is not None:
        flat_limit = max(FLAT_RSS_TOLERANCE[0], rss_peak_small * FLAT_RSS_TOLERANCE[1])
    rss_growth = (
        None
        if rss_peak_large is None or rss_peak_small is None
        else rss_peak_large - rss_peak_small
    )

    def target(
        name: str, value: float | None, threshold: str, holds: bool | None
    ) -> dict[str, Any]:
        return {"name": name, "value": value, "threshold": threshold, "holds": holds}

    def at_least(name: str, value: float | None, bound: float) -> dict[str, Any]:
        holds = None if value is None else value >= bound
        return target(name, value, f">= {bound:g}", holds)

    def at_most(name: str, value: float | None, bound: float, unit: str = "") -> dict[str, Any]:
        holds = None if value is None else value <= bound
        return target(name, value, f"<= {bound:g}{unit}", holds)

    # The target is about dispatch "in its default setting": NOTIFY is off unless a producer
    # sets ROUTEMQ_OUTBOX_NOTIFY=1 (its cost is reported beside it). MariaDB has no NOTIFY.
    mysql = _family(results) == "mysql"
    overhead_8 = ratios.get(f"dispatch_overhead_{'ours' if mysql else 'ours_no_notify'}_8conn")
    dispatch_name = (
        "dispatch <= 15% slower than raw INSERT, 8 conns"
        if mysql
        else "dispatch (default: NOTIFY off) <= 15% slower than raw INSERT, 8 conns"
    )
    p50 = _number(_get(results, "latency", "routemq_listen", "p50_ms"))
    targets = [
        at_least("drain >= 2.5x PgQueuer", ratios["drain_ours_over_pgqueuer"], 2.5),
        at_least("drain >= 30x procrastinate", ratios["drain_ours_over_procrastinate"], 30),
        at_least("drain >= 50% of raw ceiling", ratios["drain_ours_over_raw_ceiling"], 0.5),
        at_least("bulk enqueue >= 2.5x PgQueuer", ratios["enqueue_ours_over_pgqueuer"], 2.5),
        at_most(dispatch_name, overhead_8, 0.15),
        at_most("latency p50 <= 10 ms with NOTIFY", p50, 10.0, " ms"),
        _plan_target(results, (claim_small, claim_large), mysql=mysql),
        at_most(
            f"claim at {claim_large} backlog within 2x of {claim_small}",
            ratios["claim_large_over_small"],
            2.0,
        ),
        target(
            f"worker RSS draining {rss_large} < 150 MB",
            rss_peak_large,
            "< 150 MiB",
            None if rss_peak_large is None else rss_peak_large < 150.0,
        ),
        target(
            f"worker RSS flat ({rss_small} -> {rss_large})",
            rss_growth,
            "<= " + ("?" if flat_limit is None else f"{flat_limit:.1f}") + " MiB growth",
            None if rss_growth is None or flat_limit is None else rss_growth <= flat_limit,
        ),
    ]
    return ratios, targets


def _plan_target(
    results: dict[str, Any], backlogs: tuple[str, str], *, mysql: bool = False
) -> dict[str, Any]:
    """Our claim must find its rows through ix_jobs_claim_by_priority
    (ix_jobs_claim_by_priority_mysql on MariaDB) and never scan the table."""
    verdicts = []
    for backlog in backlogs:
        entry = _get(results, "claim", backlog)
        if not entry:
            verdicts.append(None)
            continue
        verdicts.append(bool(entry.get("uses_claim_index")) and not entry.get("seq_scan_on_jobs"))
    known = [v for v in verdicts if v is not None]
    index, scan = (
        ("ix_jobs_claim_by_priority_mysql", "full scan")
        if mysql
        else ("ix_jobs_claim_by_priority", "Seq Scan")
    )
    return {
        "name": f"claim plan: {index}, no {scan} ({' and '.join(backlogs)} backlog)",
        "value": sum(1 for v in known if v),
        "threshold": f"{len(backlogs)} of {len(backlogs)} plans",
        "holds": None if len(known) < len(backlogs) else all(known),
    }


def _positive(problems: list[str], label: str, value: Any) -> None:
    number = _number(value)
    if number is None:
        problems.append(f"{label}: missing")
    elif number <= 0:
        problems.append(f"{label}: {number} is not > 0")


def find_problems(results: dict[str, Any], systems: tuple[str, ...]) -> list[str]:
    """Every missing or insane number: the run is not to be trusted if this is not empty."""
    problems: list[str] = []
    expected_jobs = results["meta"]["sizes"]["jobs"]
    claim_small, claim_large, rss_small, rss_large = _sizes(results)

    enqueuers = [s for s in ("routemq", "pgqueuer", "procrastinate") if s in systems]
    for system in enqueuers:
        entry = _get(results, "bulk_enqueue", system) or {}
        _positive(problems, f"bulk enqueue {system} jobs/s", entry.get("jobs_per_s"))
        if entry and entry.get("stored") != expected_jobs:
            problems.append(
                f"bulk enqueue {system}: stored {entry.get('stored')} of {expected_jobs}"
            )

    drainers = enqueuers + (["raw_ceiling"] if "raw" in systems else [])
    if "routemq" in systems:
        drainers.append("routemq_cli")
    for system in drainers:
        entry = _get(results, "drain", system) or {}
        _positive(problems, f"drain {system} jobs/s", entry.get("jobs_per_s"))
        if entry and (entry.get("handled") != expected_jobs or entry.get("left") != 0):
            problems.append(
                f"drain {system}: handled {entry.get('handled')} of {expected_jobs}, "
                f"{entry.get('left')} left"
            )

    if "routemq" in systems:
        tps = _get(results, "dispatch", "median_tps") or {}
        for connections in results["meta"]["sizes"]["dispatch_transactions"]:
            for variant in (*dispatch_variants(results), "raw_insert"):
                _positive(
                    problems,
                    f"dispatch {variant} at {connections} conn tps",
                    _get(tps, str(connections), variant),
                )

    latencies = []
    if "routemq" in systems:
        mysql = _family(results) == "mysql"
        latencies += (
            ["routemq_poll", "routemq_poll_fast"] if mysql else ["routemq_listen", "routemq_poll"]
        )
    latencies += [f"{s}_listen" for s in ("pgqueuer", "procrastinate") if s in systems]
    for name in latencies:
        entry = _get(results, "latency", name) or {}
        p50, p99 = _number(entry.get("p50_ms")), _number(entry.get("p99_ms"))
        if p50 is None or p99 is None:
            problems.append(f"latency {name}: missing")
            continue
        if p50 > p99:
            problems.append(f"latency {name}: p50 {p50:.3f} ms > p99 {p99:.3f} ms")
        # A few slightly negative samples can happen on a loaded machine (see
        # harness.sample_latency); a median at or below zero cannot.
        if p50 <= 0:
            problems.append(f"latency {name}: impossible p50 of {p50:.3f} ms")

    if "routemq" in systems:
        for backlog in (claim_small, claim_large):
            entry = _get(results, "claim", backlog) or {}
            _positive(problems, f"claim at {backlog} median ms", entry.get("median_ms"))
            if entry and entry.get("claimed") != 100 * entry.get("claims", -1):
                problems.append(f"claim at {backlog}: claimed {entry.get('claimed')} jobs")
            if entry and not entry.get("plan"):
                problems.append(f"claim at {backlog}: no EXPLAIN plan recorded")
        for backlog in (rss_small, rss_large):
            entry = _get(results, "rss", backlog) or {}
            _positive(problems, f"worker RSS at {backlog} peak MiB", entry.get("peak_mib"))
            if entry and entry.get("left") != 0:
                problems.append(f"worker RSS at {backlog}: {entry.get('left')} jobs left")
    return problems
