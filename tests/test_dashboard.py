"""The dashboard over HTTP, on every engine: each page, each action, and what guards them.

Requests go through httpx's ASGI transport to the app on the test's own event loop and engine;
what an action changed is read back from the tables.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from routemq_outbox import Worker, WorkerSettings, admin, queue, sql
from routemq_outbox.cli import app as cli_app
from routemq_outbox.dashboard import app as dashboard_app
from routemq_outbox.dashboard import create_app
from routemq_outbox.database import create_engine
from routemq_outbox.errors import ConfigurationError
from routemq_outbox.schema import db_now_plus, failed_jobs, job_counts, jobs

from . import jobs as test_jobs

BASE = "http://dash.test"
SAME_ORIGIN = {"origin": BASE}
SCRIPT = "<script>alert('owned')</script>"


# ----------------------------------------------------------------------------- seeding


async def add_jobs(
    engine: AsyncEngine, count: int, queue_name: str = "default", *, delay: float = 0.0, **data: Any
) -> list[int]:
    """Dispatch Record jobs (``delay`` seconds ahead, or due a minute ago); their ids."""
    batch = []
    for i in range(count):
        job = test_jobs.Record()
        job.key = data.get("key", f"k{i}")
        batch.append(job)
    async with engine.begin() as conn:
        first = (
            await conn.execute(sa.select(sa.func.coalesce(sa.func.max(jobs.c.id), 0)))
        ).scalar()
        await queue.bulk(batch, queue=queue_name, delay=delay or None, session=conn)
        if not delay:
            await conn.execute(
                sa.update(jobs).where(jobs.c.id > first).values(available_at=db_now_plus(-60.0))
            )
        ids = await conn.execute(sa.select(jobs.c.id).where(jobs.c.id > first).order_by(jobs.c.id))
        return list(ids.scalars())


async def add_failed(
    engine: AsyncEngine,
    count: int = 1,
    queue_name: str = "default",
    error: str = "ValueError: boom",
) -> list[int]:
    ids = []
    async with engine.begin() as conn:
        for i in range(count):
            payload = json.dumps({"job": "tests.record", "data": {"key": f"f{i}"}})
            result = await conn.execute(
                sa.insert(failed_jobs)
                .values(
                    uuid=str(uuid.uuid4()),
                    connection="default",
                    queue=queue_name,
                    payload=payload,
                    exception=f"{error}\n\nTraceback (most recent call last):\n"
                    f'  File "app.py", line 1, in handle\n{error}',
                    attempts=3,
                    job_id=1000 + i,
                )
                .returning(failed_jobs.c.id)
            )
            ids.append(int(result.scalar_one()))
    return ids


async def count(engine: AsyncEngine, table: sa.Table, *where: Any) -> int:
    async with engine.connect() as conn:
        found = await conn.execute(sa.select(sa.func.count()).select_from(table).where(*where))
        return int(found.scalar_one())


# ----------------------------------------------------------------------------- clients


def client_of(application: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=application), base_url=BASE, **kwargs
    )


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(create_app(engine)) as http:
        yield http


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, "the page has no action form"
    return found[1]


async def act(
    http: httpx.AsyncClient, page: str, action: str, data: dict[str, Any], **headers: str
) -> httpx.Response:
    """POST ``data`` to ``action`` as the form on ``page`` does (its CSRF token, its origin)."""
    token = csrf_of(await http.get(page))
    return await http.post(action, data={"csrf": token, **data}, headers={**SAME_ORIGIN, **headers})


# ----------------------------------------------------------------------------- pages


async def test_every_page_answers_with_what_the_tables_hold(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    (due,) = await add_jobs(engine, 1, "mail")
    await add_jobs(engine, 2, "mail", delay=3600)
    (failed,) = await add_failed(engine, 1, "mail", error="KeyError: 'customer'")

    overview = await client.get("/")
    assert overview.status_code == 200
    row = re.search(r'<tr data-queue="mail">(.*?)</tr>', overview.text, re.S)
    assert row, overview.text
    assert re.findall(r'<td class="n">(?:<a [^>]*>)?(\d+)<', row[1])[:4] == ["1", "2", "0", "1"]
    assert "<svg" in overview.text

    listed = await client.get("/jobs", params={"queue": "mail"})
    assert listed.status_code == 200
    assert len(re.findall(r"<tr data-job=", listed.text)) == 3
    delayed = await client.get("/jobs", params={"queue": "mail", "state": "delayed"})
    assert len(re.findall(r'data-state="delayed"', delayed.text)) == 2
    assert 'data-state="pending"' not in delayed.text

    detail = await client.get(f"/jobs/{due}")
    assert detail.status_code == 200
    assert "tests.record" in detail.text
    assert "&#34;key&#34;: &#34;k0&#34;" in detail.text  # pretty-printed, escaped

    failed_list = await client.get("/failed")
    assert failed_list.status_code == 200
    assert "KeyError: &#39;customer&#39;" in failed_list.text
    failed_detail = await client.get(f"/failed/{failed}")
    assert "Traceback (most recent call last)" in failed_detail.text

    for path in ("/queues", "/workers", "/schedules"):
        page = await client.get(path)
        assert page.status_code == 200, path
    assert 'data-queue="mail"' in (await client.get("/queues")).text


async def test_counts_past_the_cap_show_it_with_a_plus_and_menus_list_names(
    client: httpx.AsyncClient, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard_app, "COUNT_CAP", 3)
    await add_jobs(engine, 5, "mail")
    await add_jobs(engine, 3, "mail", delay=3600)
    await add_failed(engine, 4, "mail")
    await add_failed(engine, 1, "old")
    await add_jobs(engine, 1, "sms", delay=3600)

    for path in ("/", "/queues"):
        page = await client.get(path)
        row = re.search(r'<tr data-queue="mail">(.*?)</tr>', page.text, re.S)
        assert row, page.text
        cells = re.findall(r'<td class="n">(?:<a [^>]*>)?([\d,+]+)<', row[1])[:4]
        assert cells == ["3+", "3", "0", "3+"], path

    def menu(page: httpx.Response) -> list[str]:
        found = re.search(r'<select name="queue">(.*?)</select>', page.text, re.S)
        assert found, page.text
        return re.findall(r"<option(?: selected)?>([^<]+)</option>", found[1])

    assert menu(await client.get("/jobs")) == ["mail", "old", "sms"]
    assert menu(await client.get("/jobs")) == await sql.known_queues(engine)
    assert menu(await client.get("/failed")) == ["mail", "old"]


async def test_unknown_ids_and_bad_parameters_are_refused_with_a_page(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.get("/jobs/987654")
    assert missing.status_code == 404
    assert "987654" in missing.text
    assert (await client.get("/failed/987654")).status_code == 404
    assert (await client.get("/jobs", params={"state": "sleeping"})).status_code == 400
    assert (await client.get("/jobs", params={"after": "x"})).status_code == 400
    assert (await client.get("/failed", params={"before": "-1"})).status_code == 400
    assert (await client.get("/nowhere")).status_code == 404


async def test_payload_and_error_text_show_as_text_not_markup(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    (job_id,) = await add_jobs(engine, 1, key=SCRIPT)
    (failed,) = await add_failed(engine, 1, error=f"ValueError: {SCRIPT}")
    for path in (f"/jobs/{job_id}", "/failed", f"/failed/{failed}", "/jobs"):
        page = await client.get(path)
        assert page.status_code == 200
        assert "<script" not in page.text, path
    assert (
        "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;"
        in (await client.get(f"/failed/{failed}")).text
    )


async def test_jobs_pages_follow_the_keyset(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    ids = await add_jobs(engine, 60, "bulk")
    first = await client.get("/jobs", params={"queue": "bulk"})
    shown = [int(i) for i in re.findall(r'<tr data-job="(\d+)"', first.text)]
    assert shown == ids[:50]
    link = re.search(r'<a rel="next" href="([^"]+)"', first.text)
    assert link
    second = await client.get(link[1].replace("&amp;", "&"))
    assert [int(i) for i in re.findall(r'<tr data-job="(\d+)"', second.text)] == ids[50:]
    assert 'rel="next"' not in second.text


async def test_failed_pages_go_from_newest_to_oldest(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    ids = await add_failed(engine, 55)
    first = await client.get("/failed")
    assert "55 failed jobs" in first.text
    shown = [int(i) for i in re.findall(r'<tr data-failed="(\d+)"', first.text)]
    assert shown == sorted(ids, reverse=True)[:50]
    link = re.search(r'<a rel="next" href="([^"]+)"', first.text)
    assert link
    second = await client.get(link[1].replace("&amp;", "&"))
    older = [int(i) for i in re.findall(r'<tr data-failed="(\d+)"', second.text)]
    assert older == sorted(ids, reverse=True)[50:]


# ----------------------------------------------------------------------------- actions


async def test_failed_jobs_are_retried_and_forgotten_one_some_or_all_matching(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    a1, a2, a3 = await add_failed(engine, 3, "a")
    await add_failed(engine, 2, "b")
    await add_failed(engine, 2, "c")

    done = await act(client, f"/failed/{a1}", "/failed/action", {"action": "retry", "id": a1})
    assert done.status_code == 303
    assert done.headers["location"] == "/failed?done=retried&n=1"
    assert "Retried 1 failed job." in (await client.get(done.headers["location"])).text
    assert await count(engine, jobs, jobs.c.queue == "a") == 1

    forgot = await act(
        client, "/failed", "/failed/action", {"action": "forget", "id": [str(a2), str(a3)]}
    )
    assert forgot.headers["location"] == "/failed?done=forgot&n=2"
    assert await count(engine, failed_jobs, failed_jobs.c.queue == "a") == 0
    assert await count(engine, jobs, jobs.c.queue == "a") == 1

    retried = await act(
        client, "/failed", "/failed/action", {"action": "retry-matching", "queue": "b"}
    )
    assert retried.headers["location"] == "/failed?queue=b&done=retried&n=2"
    assert await count(engine, jobs, jobs.c.queue == "b") == 2
    assert await count(engine, failed_jobs) == 2

    flushed = await act(client, "/failed", "/failed/action", {"action": "forget-matching"})
    assert flushed.headers["location"] == "/failed?done=forgot&n=2"
    assert await count(engine, failed_jobs) == 0

    # No failed job left to show a form: the queues page has one, with the same token.
    gone = await act(client, "/queues", "/failed/action", {"action": "retry", "id": a1})
    assert gone.status_code == 404
    nothing = await act(client, "/queues", "/failed/action", {"action": "retry"})
    assert nothing.status_code == 400


async def test_jobs_are_made_due_and_cancelled(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    later = await add_jobs(engine, 3, "mail", delay=3600)
    await add_jobs(engine, 2, "other")

    ran = await act(client, "/jobs", "/jobs/action", {"action": "run-now", "id": later[0]})
    assert ran.status_code == 303
    assert "done=ran&n=1" in ran.headers["location"]
    assert (await admin.show_job(engine, later[0])).state == "pending"
    assert (await admin.show_job(engine, later[1])).state == "delayed"

    cancelled = await act(client, "/jobs", "/jobs/action", {"action": "cancel", "id": later[1]})
    assert "done=cancelled&n=1" in cancelled.headers["location"]
    assert await count(engine, jobs, jobs.c.id == later[1]) == 0
    assert await count(engine, failed_jobs, failed_jobs.c.job_id == later[1]) == 1

    matching = await act(
        client,
        "/jobs?queue=other",
        "/jobs/action",
        {"action": "cancel-matching", "queue": "other", "job": "tests.record"},
    )
    assert "done=cancelled&n=2" in matching.headers["location"]
    assert await count(engine, jobs, jobs.c.queue == "other") == 0
    assert await count(engine, jobs, jobs.c.queue == "mail") == 2

    unknown = await act(client, "/jobs", "/jobs/action", {"action": "run-now", "id": 987654})
    assert unknown.status_code == 404
    assert await count(engine, jobs) == 2


async def test_queues_are_paused_and_resumed(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await add_jobs(engine, 1, "mail")
    paused = await act(client, "/queues", "/queues/action", {"action": "pause", "queue": "mail"})
    assert paused.headers["location"] == "/queues?done=paused&q=mail"
    assert [q.paused for q in await admin.list_queues(engine) if q.name == "mail"] == [True]
    page = await client.get(paused.headers["location"])
    assert "Paused queue mail." in page.text
    assert 'value="resume"' in page.text

    resumed = await act(client, "/queues", "/queues/action", {"action": "resume", "queue": "mail"})
    assert resumed.headers["location"] == "/queues?done=resumed&q=mail"
    assert [q.paused for q in await admin.list_queues(engine) if q.name == "mail"] == [False]
    bad = await act(client, "/queues", "/queues/action", {"action": "pause", "queue": ""})
    assert bad.status_code == 400


async def test_a_done_message_says_only_what_the_dashboard_writes(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/queues", params={"done": "paused", "q": SCRIPT})
    assert "<script" not in page.text
    odd = await client.get("/queues", params={"done": "Your account is locked"})
    assert "locked" not in odd.text


# ----------------------------------------------------------------------------- guards


async def test_actions_need_the_token_and_the_same_origin(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    (failed,) = await add_failed(engine)
    token = csrf_of(await client.get("/failed"))
    form = {"csrf": token, "action": "forget", "id": failed}
    refusals = [
        await client.post("/failed/action", data={**form, "csrf": "0" * 64}, headers=SAME_ORIGIN),
        await client.post("/failed/action", data={k: v for k, v in form.items() if k != "csrf"}),
        await client.post("/failed/action", data=form),  # neither Origin nor Referer
        await client.post("/failed/action", data=form, headers={"origin": "http://evil.test"}),
        await client.post("/failed/action", data=form, headers={"origin": "null"}),
        await client.post("/failed/action", data=form, headers={"referer": "http://evil.test/x"}),
    ]
    assert [r.status_code for r in refusals] == [403] * 6
    assert (await client.get("/failed/action")).status_code == 405
    assert await count(engine, failed_jobs) == 1

    # A browser that sends no Origin on a same-origin POST still sends the Referer.
    by_referer = await client.post(
        "/failed/action", data=form, headers={"referer": f"{BASE}/failed"}
    )
    assert by_referer.status_code == 303
    assert await count(engine, failed_jobs) == 0


async def test_each_app_has_its_own_token(engine: AsyncEngine) -> None:
    await add_failed(engine)
    async with client_of(create_app(engine)) as one, client_of(create_app(engine)) as two:
        assert csrf_of(await one.get("/failed")) != csrf_of(await two.get("/failed"))


async def test_read_only_shows_no_action_and_refuses_every_one(engine: AsyncEngine) -> None:
    (failed,) = await add_failed(engine)
    (job_id,) = await add_jobs(engine, 1, "mail")
    async with client_of(create_app(engine, read_only=True)) as http:
        for path in ("/", "/jobs", f"/jobs/{job_id}", "/failed", f"/failed/{failed}", "/queues"):
            page = await http.get(path)
            assert page.status_code == 200
            assert "<form" not in page.text.replace('<form class="filters" method="get"', ""), path
            assert "read-only" in page.text
        forms = [
            ("/failed/action", {"action": "forget", "id": failed}),
            ("/jobs/action", {"action": "cancel", "id": job_id}),
            ("/queues/action", {"action": "pause", "queue": "mail"}),
            ("/schedules/action", {"name": "x"}),
        ]
        for action, data in forms:
            refused = await http.post(action, data=data, headers=SAME_ORIGIN)
            assert refused.status_code == 403, action
            assert "read-only" in refused.text
    assert await count(engine, failed_jobs) == 1
    assert await count(engine, jobs) == 1
    assert not any(q.paused for q in await admin.list_queues(engine))


async def test_http_basic_guards_every_path(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DASHBOARD_USER", "ops")
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DASHBOARD_PASSWORD", "s3cret:pass")
    application = create_app(engine)
    async with client_of(application) as anonymous:
        for path in ("/", "/failed", "/static/dashboard.css"):
            refused = await anonymous.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic ")
        assert (await anonymous.get("/", auth=("ops", "wrong"))).status_code == 401
        assert (await anonymous.get("/", auth=("ops", "s3cret"))).status_code == 401
        assert (await anonymous.get("/", headers={"authorization": "Basic !!"})).status_code == 401
        assert (await anonymous.get("/", auth=("ops", "s3cret:pass"))).status_code == 200
        assert (
            await anonymous.get("/static/dashboard.css", auth=("ops", "s3cret:pass"))
        ).status_code == 200


async def test_half_the_credentials_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DASHBOARD_USER", "ops")
    engine = create_engine(sqlite_url)
    with pytest.raises(ConfigurationError, match="PASSWORD"):
        create_app(engine)
    await engine.dispose()


async def test_mounted_under_a_prefix_its_links_and_redirects_keep_it(
    engine: AsyncEngine,
) -> None:
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/outbox", create_app(engine))
    (failed,) = await add_failed(engine)
    async with client_of(outer) as http:
        page = await http.get("/outbox/failed")
        assert page.status_code == 200
        links = re.findall(r'(?:href|action)="([^"]+)"', page.text)
        assert links
        assert all(link.startswith("/outbox/") for link in links), links
        assert f'href="/outbox/failed/{failed}"' in page.text
        assert (await http.get("/outbox/static/dashboard.css")).status_code == 200
        done = await act(
            http, "/outbox/failed", "/outbox/failed/action", {"action": "retry", "id": failed}
        )
        assert done.headers["location"] == "/outbox/failed?done=retried&n=1"


# ----------------------------------------------------------------------------- throughput


async def test_workers_add_what_they_finish_to_the_per_minute_counts(
    client: httpx.AsyncClient, engine: AsyncEngine, db_url: str, log_table: None
) -> None:
    await add_jobs(engine, 5, "tally")
    bad = test_jobs.AlwaysFails()
    await queue.push(bad, queue="tally", session=None)
    settings = WorkerSettings(
        database_url=db_url, queues=("tally",), stop_when_empty=True, max_tries=1, sleep=0.05
    )
    stats = await Worker(settings, engine=engine).run()
    assert (stats.succeeded, stats.failed) == (5, 1)

    points = await admin.throughput(engine)
    assert len(points) == admin.THROUGHPUT_MINUTES
    assert (sum(p.succeeded for p in points), sum(p.failed for p in points)) == (5, 1)
    assert points[-1].minute > points[0].minute
    assert (await admin.throughput(engine, queue="elsewhere"))[-1].succeeded == 0
    overview = await client.get("/")
    assert "5 succeeded, 1 failed" in overview.text


async def test_counts_add_up_in_one_statement_and_old_ones_are_pruned(engine: AsyncEngine) -> None:
    for counts in ({"a": (2, 1), "b": (1, 0)}, {"a": (3, 0)}):
        async with engine.connect() as conn:
            await sql.record_counts(conn, counts)
    async with engine.begin() as conn:
        await conn.execute(sa.insert(job_counts).values(minute=1, queue="a", succeeded=7, failed=7))
    assert await count(engine, job_counts) in (3, 4)  # the two calls may straddle a minute
    points = await admin.throughput(engine)
    assert (sum(p.succeeded for p in points), sum(p.failed for p in points)) == (6, 1)
    async with engine.connect() as conn:
        await sql.housekeep(conn)
    assert await count(engine, job_counts, job_counts.c.minute == 1) == 0
    assert await count(engine, job_counts) >= 2


# ----------------------------------------------------------------------------- command


def test_the_command_refuses_other_addresses_without_credentials() -> None:
    result = CliRunner().invoke(cli_app, ["dashboard", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "without a password" in result.output
    assert "ROUTEMQ_OUTBOX_DASHBOARD_USER" in result.output


def test_the_command_names_the_extra_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = CliRunner().invoke(cli_app, ["dashboard"])
    assert result.exit_code == 2
    assert 'pip install "routemq-outbox[dashboard]"' in result.output
