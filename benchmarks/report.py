"""The printed report: absolute numbers, ratios, targets and problems as plain text tables.

A MariaDB run (``meta.family == "mysql"``) prints the same sections with the rows that exist
there: no peers, one dispatch variant (no NOTIFY), polling latencies, InnoDB plan facts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render"]


def _num(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def _x(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ms(seconds: Any) -> Any:
    return seconds * 1000 if isinstance(seconds, int | float) else None


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def _table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns in ``left`` are text (left-aligned); the others are numbers (right-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for index, row in enumerate([headers, *rows]):
        cells = [
            str(cell).ljust(width) if i in left else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
        if index == 0:
            lines.append("  " + "  ".join("-" * width for width in widths))
    return lines


def _rate_row(
    label: str, entry: dict[str, Any] | None, ratio: Any, note: str | None = None
) -> list[str]:
    entry = entry or {}
    row = [
        label,
        _num(entry.get("jobs_per_s")),
        "" if label.startswith("routemq-outbox") else _x(ratio),
        _num(entry.get("client_cpu_us_per_job")),
    ]
    return row if note is None else [*row, note]


def _access(accesses: Any) -> str:
    """MariaDB plan accesses as ``range on ix_jobs_claim_by_priority_mysql``."""
    if not accesses:
        return "n/a"
    return ", ".join(f"{kind} on {key}" for kind, key in accesses)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    sizes = meta["sizes"]
    server = meta.get("server", {})
    versions = meta.get("versions", {})
    ratios = results.get("ratios", {})
    out: list[str] = []

    mysql = meta.get("family") == "mysql"
    server_name = "MariaDB" if mysql else "PostgreSQL"
    mode = "quick" if meta["quick"] else "full"
    out.append(
        f"routemq-outbox benchmarks: {mode} run, {sizes['jobs']:,} jobs per enqueue/drain, "
        f"{meta['wall_seconds']:.0f} s"
    )
    if mysql:
        pool = server.get("innodb_buffer_pool_size")
        pool_mib = f"{int(pool) / 2**20:,.0f} MiB" if str(pool).isdigit() else pool
        out.append(
            f"MariaDB {server.get('version')} "
            f"(innodb_flush_log_at_trx_commit={server.get('innodb_flush_log_at_trx_commit')}, "
            f"log_bin={server.get('log_bin')}, innodb_buffer_pool_size={pool_mib}, "
            f"server isolation {server.get('tx_isolation') or server.get('transaction_isolation')}"
            ", routemq-outbox sessions READ COMMITTED); "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
        )
    else:
        out.append(
            f"PostgreSQL {server.get('version')} "
            f"(synchronous_commit={server.get('synchronous_commit')}, "
            f"fsync={server.get('fsync')}, autovacuum={server.get('autovacuum')}, "
            f"shared_buffers={server.get('shared_buffers')}); "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
        )

    before = meta.get("machine", {}).get("before", {})
    if before.get("cpu_busy_share") is not None:
        out.append(
            f"Machine: {before.get('cpus')} CPUs, {before['cpu_busy_share']:.0%} busy in the "
            f"second before the run (load average {before.get('loadavg_1min')}); any other load "
            "makes every number here noisy"
        )
    during = meta.get("machine", {}).get("during", {})
    if during.get("foreign_cpu_seconds") is not None:
        out.append(
            f"Other processes used {during['foreign_cpu_seconds']:.0f} CPU-seconds during the run "
            f"({during['foreign_cpu_share']:.0%} of all CPUs; {server_name} work they caused "
            "not counted)"
        )

    enqueue = results.get("bulk_enqueue", {})
    out += ["", f"Bulk enqueue, {sizes['enqueue_chunk']:,} jobs per call/transaction"]
    enqueue_rows = [_rate_row("routemq-outbox", enqueue.get("routemq"), None)]
    if not mysql:
        enqueue_rows += [
            _rate_row(
                "PgQueuer", enqueue.get("pgqueuer"), ratios.get("enqueue_ours_over_pgqueuer")
            ),
            _rate_row(
                "procrastinate",
                enqueue.get("procrastinate"),
                ratios.get("enqueue_ours_over_procrastinate"),
            ),
        ]
    out += _table(["system", "jobs/s", "ours / system", "client CPU us/job"], enqueue_rows)
    if mysql:
        out.append("  (PgQueuer and procrastinate run on PostgreSQL only)")

    drain = results.get("drain", {})
    settings = meta.get("settings", {})
    ours_settings = settings.get("routemq_drain", {})
    ours_drain = drain.get("routemq", {})
    pgq = drain.get("pgqueuer", {})
    pgq_configs = "; ".join(
        f"{c['instances']}x{c['batch_size']}: {c['jobs_per_s']:,.0f}"
        for c in pgq.get("configs", [])
    )
    out += ["", "Drain of a backlog of no-op jobs"]
    ours_row = _rate_row(
        "routemq-outbox",
        ours_drain,
        None,
        f"concurrency {ours_settings.get('concurrency')}, "
        f"batch {ours_settings.get('batch_size')}; "
        f"{_num(ours_drain.get('jobs_per_claim'))} jobs/claim, "
        f"{_num(ours_drain.get('jobs_per_delete'))} jobs/delete",
    )
    cli_drain = drain.get("routemq_cli", {})
    cli_flags = " ".join(settings.get("routemq_drain_cli", {}).get("flags", []))
    cli_row = _rate_row(
        "routemq-outbox CLI",
        cli_drain,
        None,
        f"`work {cli_flags}`, other flags default; stderr to a file "
        f"({_num(cli_drain.get('log_lines'))} log lines)",
    )
    raw_row = _rate_row(
        "raw SQL ceiling",
        drain.get("raw_ceiling"),
        ratios.get("drain_ours_over_raw_ceiling"),
        f"{'asyncmy' if mysql else 'asyncpg'}, {sizes['raw_connections']} conns, "
        f"claim {sizes['raw_batch']} + delete",
    )
    drain_rows = (
        [ours_row, cli_row, raw_row]
        if mysql
        else [
            ours_row,
            cli_row,
            _rate_row(
                "PgQueuer",
                pgq,
                ratios.get("drain_ours_over_pgqueuer"),
                f"instances x batch: {pgq_configs}" if pgq_configs else "",
            ),
            _rate_row(
                "procrastinate",
                drain.get("procrastinate"),
                ratios.get("drain_ours_over_procrastinate"),
                f"concurrency {settings.get('procrastinate_drain_concurrency')}",
            ),
            raw_row,
        ]
    )
    out += _table(
        ["system", "jobs/s", "ours / system", "client CPU us/job", "settings"],
        drain_rows,
        left=(0, 4),
    )
    out.append(
        "  CLI: from its first job's start to its exit; "
        f"{_num(_ms(cli_drain.get('startup_seconds')))} ms before that (engine, connections, "
        f"first claim): {_num(cli_drain.get('jobs_per_s_from_import'))} jobs/s with it, "
        f"{_num(cli_drain.get('jobs_per_s_incl_startup'))} with interpreter start-up too. "
        f"CLI / in-process {_x(ratios.get('drain_cli_over_in_process'))}, "
        f"CLI / raw ceiling {_x(ratios.get('drain_cli_over_raw_ceiling'))}"
    )

    tps = results.get("dispatch", {}).get("median_tps", {})
    conns = [str(c) for c in sizes["dispatch_transactions"]]
    out += [
        "",
        "Transactional dispatch: business INSERT + enqueue one job, commit (transactions/s)",
    ]
    if mysql:
        labels = {
            "ours": "routemq-outbox dispatch(job, session=conn)",
            "raw_insert": "raw SQLAlchemy INSERT (baseline)",
        }
        overheads = {"ours": "extra time vs baseline"}
    else:
        labels = {
            "ours_notify": "routemq-outbox, NOTIFY on",
            "ours_no_notify": "routemq-outbox, NOTIFY off (default)",
            "raw_insert": "raw SQLAlchemy INSERT (baseline)",
        }
        overheads = {
            variant: f"extra time vs baseline, {labels[variant].split(', ')[1]}"
            for variant in ("ours_notify", "ours_no_notify")
        }
    rows = [[label] + [_num(tps.get(c, {}).get(v)) for c in conns] for v, label in labels.items()]
    for variant, label in overheads.items():
        rows.append(
            [label] + [_pct(ratios.get(f"dispatch_overhead_{variant}_{c}conn")) for c in conns]
        )
    out += _table(["variant"] + [f"{c} conn" for c in conns], rows)

    latency = results.get("latency", {})
    out += ["", "Latency from dispatch commit to handle() start, idle worker (ms)"]
    latency_rows = []
    latency_labels = (
        (
            ("routemq_poll", "routemq-outbox, polling (--sleep 1, the default)"),
            ("routemq_poll_fast", "routemq-outbox, polling (--sleep 0.1)"),
        )
        if mysql
        else (
            ("routemq_listen", "routemq-outbox, LISTEN/NOTIFY"),
            ("routemq_poll", "routemq-outbox, polling (--no-listen, sleep 1 s)"),
            ("pgqueuer_listen", "PgQueuer (LISTEN/NOTIFY)"),
            ("procrastinate_listen", "procrastinate (LISTEN/NOTIFY)"),
        )
    )
    for key, label in latency_labels:
        entry = latency.get(key, {})
        latency_rows.append(
            [
                label,
                _num(entry.get("p50_ms"), 2),
                _num(entry.get("p99_ms"), 2),
                _num(entry.get("max_ms"), 2),
                _num(entry.get("samples")),
                _num(entry.get("commit_p50_ms"), 2),
            ]
        )
    out += _table(["worker", "p50", "p99", "max", "samples", "COMMIT p50"], latency_rows)
    if mysql:
        out.append("  (MariaDB has no LISTEN/NOTIFY: workers find new jobs by polling)")

    claim = results.get("claim", {})
    out += ["", "Claim of 100 jobs with our claim statement (client-side ms, incl. commit)"]
    claim_rows = []
    for backlog in (str(sizes["claim_small"]), str(sizes["claim_large"])):
        entry = claim.get(backlog, {})
        claim_rows.append(
            [
                f"{int(backlog):,} backlog",
                _num(entry.get("median_ms"), 2),
                _num(entry.get("p90_ms"), 2),
                _num(entry.get("first_ms"), 2),
                _num(entry.get("plan_execution_ms"), 2),
                _num(entry.get("uses_claim_index")),
                _num(entry.get("seq_scan_on_jobs")),
            ]
        )
    index, scan = (
        ("ix_jobs_claim_by_priority_mysql", "full scan")
        if mysql
        else ("ix_jobs_claim_by_priority", "seq scan")
    )
    out += _table(
        ["backlog", "median", "p90", "first", "EXPLAIN exec", index, scan],
        claim_rows,
    )
    out.append(f"  large / small median: {_x(ratios.get('claim_large_over_small'))}")
    if mysql:
        for backlog in (str(sizes["claim_small"]), str(sizes["claim_large"])):
            entry = claim.get(backlog, {})
            if entry:
                out.append(
                    f"  {int(backlog):,}: SELECT … FOR UPDATE SKIP LOCKED "
                    f"{_access(entry.get('plan_select_access'))}, "
                    f"{_num(entry.get('plan_select_rows_read'))} rows read "
                    f"({_num(entry.get('plan_select_pages'))} pages; undo history "
                    f"{_num(entry.get('history_list_length'))}), filesort "
                    f"{_num(entry.get('filesort'))}; UPDATE "
                    f"{_access(entry.get('plan_update_access'))}"
                )

    rss = results.get("rss", {})
    out += ["", "Peak RSS of the CLI worker draining a backlog (--stop-when-empty)"]
    rss_rows = []
    for backlog in (str(sizes["rss_small"]), str(sizes["rss_large"])):
        entry = rss.get(backlog, {})
        rss_rows.append(
            [
                f"{int(backlog):,} jobs",
                _num(entry.get("peak_mib"), 1),
                _num(entry.get("last_rss_mib"), 1),
                _num(entry.get("wall_seconds"), 1),
                _num(entry.get("jobs_per_s_incl_startup")),
            ]
        )
    out += _table(
        ["backlog", "peak MiB (VmHWM)", "last RSS", "wall s", "jobs/s incl. start-up"],
        rss_rows,
    )

    out += ["", "Targets (reported, not asserted)"]
    target_rows = []
    for target in results.get("targets", []):
        holds = target["holds"]
        verdict = "n/a" if holds is None else ("HOLDS" if holds else "MISSED")
        value = target["value"]
        target_rows.append(
            [
                target["name"],
                _num(value, 3),
                target["threshold"],
                verdict,
            ]
        )
    out += _table(["target", "value", "needs", "verdict"], target_rows, left=(0, 2, 3))

    problems = results.get("problems", [])
    out += ["", "Problems: " + ("none" if not problems else f"{len(problems)}")]
    out += [f"  - {problem}" for problem in problems]
    return "\n".join(out)
