"""The dashboard's ASGI application: pages rendered on the server from :mod:`..admin`.

Every page reads through the same functions as the CLI, and every action is a POST that carries
a CSRF token (an HMAC of a secret made when the app is created) and comes from a page of the
same origin. Links are built with ``request.url_for``, so they keep working when a bigger
application mounts the dashboard under a prefix of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import admin, scheduler
from ..config import database_url, notify_enabled
from ..database import create_engine
from ..errors import ConfigurationError, NotFound, OutboxError
from . import charts

__all__ = ["PAGE_SIZE", "PASSWORD_ENV", "USER_ENV", "create_app", "credentials"]

USER_ENV = "ROUTEMQ_OUTBOX_DASHBOARD_USER"
PASSWORD_ENV = "ROUTEMQ_OUTBOX_DASHBOARD_PASSWORD"  # noqa: S105 - the variable's name
PAGE_SIZE = 50
_MAX_SELECTED = 1000  # ids one form may name: a page's worth, with room to spare
_STATES = ("pending", "delayed", "running")
# Counts stop here ("10,000+"): an exact count reads every index entry it counts, which a
# page that refreshes every few seconds cannot afford with a million jobs waiting.
COUNT_CAP = 10_000


def credentials(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The HTTP Basic user and password from the environment, or None when neither is set."""
    env = os.environ if environ is None else environ
    user, password = env.get(USER_ENV, ""), env.get(PASSWORD_ENV, "")
    if bool(user) != bool(password):
        raise ConfigurationError(f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
    return (user, password) if user else None


class _BasicAuth:
    """HTTP Basic in front of every path, static files included."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self._expected = hashlib.sha256(f"{user}:{password}".encode()).digest()

    def _allowed(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        # Digests first: compare_digest is constant-time only for inputs of equal length.
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self._allowed(header):
                response = Response(
                    "authentication required\n",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="routemq-outbox", charset="UTF-8"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Dashboard:
    engine: AsyncEngine
    read_only: bool
    token: str
    templates: jinja2.Environment

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        page = self.templates.get_template(template).render(
            request=request,
            read_only=self.read_only,
            csrf=self.token,
            url=lambda name, **params: _url(request, name, **params),
            done=_done_message(request),
            **context,
        )
        return HTMLResponse(page, status_code=status)

    async def action_form(self, request: Request) -> FormData:
        """The form of a POST action, once it has shown it may act."""
        if self.read_only:
            raise _Refused(403, "this dashboard is read-only")
        if not _same_origin(request):
            raise _Refused(403, "the request does not come from this dashboard's pages")
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")), self.token):
            raise _Refused(403, "the form's CSRF token is missing or wrong: reload the page")
        return form


def _url(request: Request, name: str, query: dict[str, Any] | None = None, **params: Any) -> str:
    """The path of a route (under the mount's prefix), with a query of the non-empty values."""
    path = request.url_for(name, **params).path
    pairs = {key: value for key, value in (query or {}).items() if value not in (None, "")}
    return f"{path}?{urlencode(pairs)}" if pairs else path


def _same_origin(request: Request) -> bool:
    """Origin (or, without it, Referer) names the host the request was sent to."""
    host = request.headers.get("host", "")
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null" or not host:
        return False
    return urlsplit(source).netloc == host


_DONE = {
    "retried": ("Retried {n} failed job.", "Retried {n} failed jobs."),
    "forgot": ("Deleted {n} failed job.", "Deleted {n} failed jobs."),
    "cancelled": ("Cancelled {n} job.", "Cancelled {n} jobs."),
    "stopping": ("Asked {n} running job to stop.", "Asked {n} running jobs to stop."),
    "ran": ("Made {n} job due now.", "Made {n} jobs due now."),
    "paused": ("Paused queue {q}.", "Paused queue {q}."),
    "resumed": ("Resumed queue {q}.", "Resumed queue {q}."),
    "enqueued": ("Enqueued one run of {q}.", "Enqueued one run of {q}."),
}


def _done_message(request: Request) -> str | None:
    """What the last action did, from fixed texts: a link cannot make the page say anything."""
    kind = _DONE.get(request.query_params.get("done", ""))
    if kind is None:
        return None
    count = request.query_params.get("n", "")
    number = int(count) if count.isdigit() else 0
    return kind[number != 1].format(n=number, q=request.query_params.get("q", ""))


def _redirect(request: Request, name: str, query: dict[str, Any], **params: Any) -> Response:
    return RedirectResponse(_url(request, name, query, **params), status_code=303)


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > admin.MAX_FAILED_ID:
        raise _Refused(400, f"{name} must be a whole number, got {value!r}")
    return int(value)


def _ids(form: FormData) -> list[int]:
    values = [str(value) for value in form.getlist("id")]
    if len(values) > _MAX_SELECTED:
        raise _Refused(400, f"select at most {_MAX_SELECTED} jobs at once")
    if not all(value.isascii() and value.isdigit() for value in values):
        raise _Refused(400, "job ids are whole numbers")
    if not values:
        raise _Refused(400, "select at least one job")
    return [int(value) for value in values]


def _pretty(payload: str) -> str:
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except ValueError:
        return payload


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _count(queue: admin.QueueState, name: str) -> str:
    """A count of the queue's, "10,000+" when it reached the cap."""
    value: int = getattr(queue, name)
    return f"{value:,}+" if name in queue.capped else str(value)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("routemq_outbox.dashboard", "templates"),
        autoescape=True,  # every template, whatever its name: payloads are anyone's text
        undefined=jinja2.StrictUndefined,
    )
    env.filters["age"] = _age
    env.filters["when"] = _when
    env.filters["pretty"] = _pretty
    env.filters["count"] = _count
    return env


# ----------------------------------------------------------------------------- pages


def _pages(dash: _Dashboard) -> list[Route]:
    engine = dash.engine

    async def overview(request: Request) -> Response:
        queues = await admin.list_queues(engine, cap=COUNT_CAP)
        history = await admin.throughput(engine)
        return dash.render(
            request,
            "overview.html",
            queues=queues,
            chart=charts.throughput_svg(history),
            history=history,
            refresh=True,
        )

    async def jobs_page(request: Request) -> Response:
        queue = request.query_params.get("queue") or None
        state = request.query_params.get("state") or None
        if state is not None and state not in _STATES:
            raise _Refused(400, f"state must be one of {', '.join(_STATES)}, got {state!r}")
        job = request.query_params.get("job") or None
        text = request.query_params.get("text") or None
        after = _int_param(request, "after")
        page = await admin.list_jobs(
            engine, queue=queue, state=state, job=job, text=text, after=after, limit=PAGE_SIZE
        )
        filters = {"queue": queue, "state": state, "job": job, "text": text}
        return dash.render(
            request,
            "jobs.html",
            page=page,
            filters=filters,
            states=_STATES,
            queues=await admin.queue_names(engine),
            first_page=after is None,
        )

    async def job_page(request: Request) -> Response:
        job = await admin.show_job(engine, request.path_params["job_id"])
        return dash.render(request, "job.html", job=job)

    async def jobs_action(request: Request) -> Response:
        form = await dash.action_form(request)
        action = form.get("action")
        back = {"queue": form.get("queue"), "state": form.get("state"), "job": form.get("job")}
        if action == "cancel-matching":
            queue = str(form.get("queue") or "")
            if not queue:
                raise _Refused(400, "cancelling all matching jobs needs a queue")
            result = await admin.cancel_matching(
                engine, queue=queue, job=str(form.get("job") or "") or None
            )
        elif action == "cancel":
            result = await admin.cancel_jobs(engine, _ids(form))
        elif action == "run-now":
            made = await admin.run_now(engine, _ids(form))
            return _redirect(request, "jobs", {**back, "done": "ran", "n": len(made)})
        else:
            raise _Refused(400, f"unknown action {action!r}")
        done = "stopping" if result.stopping and not result.deleted else "cancelled"
        count = len(result.stopping) if done == "stopping" else len(result.deleted)
        return _redirect(request, "jobs", {**back, "done": done, "n": count})

    async def failed_page(request: Request) -> Response:
        queue = request.query_params.get("queue") or None
        before = _int_param(request, "before")
        page = await admin.list_failed(engine, queue=queue, limit=PAGE_SIZE, before=before)
        return dash.render(
            request,
            "failed.html",
            page=page,
            queue=queue,
            before=before,
            queues=await admin.queue_names(engine, failed_only=True),
            page_size=PAGE_SIZE,
        )

    async def failed_job_page(request: Request) -> Response:
        job = await admin.show_failed(engine, request.path_params["failed_id"])
        return dash.render(request, "failed_job.html", job=job)

    async def failed_action(request: Request) -> Response:
        form = await dash.action_form(request)
        action = form.get("action")
        queue = str(form.get("queue") or "") or None
        if action == "retry":
            count = await admin.retry_failed(engine, _ids(form))
        elif action == "forget":
            count = await admin.forget_failed(engine, _ids(form))
        elif action == "retry-matching":
            count = await admin.retry_failed(engine, all=True, queue=queue)
        elif action == "forget-matching":
            count = await admin.flush_failed(engine, queue=queue)
        else:
            raise _Refused(400, f"unknown action {action!r}")
        done = "retried" if action.startswith("retry") else "forgot"
        return _redirect(request, "failed", {"queue": queue, "done": done, "n": count})

    async def queues_page(request: Request) -> Response:
        return dash.render(
            request, "queues.html", queues=await admin.list_queues(engine, cap=COUNT_CAP)
        )

    async def queues_action(request: Request) -> Response:
        form = await dash.action_form(request)
        action = form.get("action")
        queue = str(form.get("queue") or "")
        if action == "pause":
            await admin.pause_queue(engine, queue)
        elif action == "resume":
            await admin.resume_queue(engine, queue)
        else:
            raise _Refused(400, f"unknown action {action!r}")
        done = "paused" if action == "pause" else "resumed"
        return _redirect(request, "queues", {"done": done, "q": queue})

    async def workers_page(request: Request) -> Response:
        return dash.render(request, "workers.html", workers=await admin.list_workers(engine))

    async def schedules_page(request: Request) -> Response:
        schedules = await scheduler.list_schedules(engine)
        return dash.render(request, "schedules.html", schedules=schedules)

    async def schedules_action(request: Request) -> Response:
        form = await dash.action_form(request)
        name = str(form.get("name") or "")
        await scheduler.run_now(engine, name, notify=notify_enabled())
        return _redirect(request, "schedules", {"done": "enqueued", "q": name})

    return [
        Route("/", overview, name="overview"),
        Route("/jobs", jobs_page, name="jobs"),
        Route("/jobs/{job_id:int}", job_page, name="job"),
        Route("/jobs/action", jobs_action, methods=["POST"], name="jobs_action"),
        Route("/failed", failed_page, name="failed"),
        Route("/failed/{failed_id:int}", failed_job_page, name="failed_job"),
        Route("/failed/action", failed_action, methods=["POST"], name="failed_action"),
        Route("/queues", queues_page, name="queues"),
        Route("/queues/action", queues_action, methods=["POST"], name="queues_action"),
        Route("/workers", workers_page, name="workers"),
        Route("/schedules", schedules_page, name="schedules"),
        Route("/schedules/action", schedules_action, methods=["POST"], name="schedules_action"),
    ]


def _guarded(
    dash: _Dashboard, endpoint: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Errors become pages: refusals and bad input with their status, unknown ids 404."""

    async def handle(request: Request) -> Response:
        try:
            return await endpoint(request)
        except _Refused as exc:
            return dash.render(request, "error.html", exc.status, message=str(exc))
        except NotFound as exc:
            return dash.render(request, "error.html", 404, message=str(exc))
        except (OutboxError, ValueError) as exc:
            return dash.render(request, "error.html", 400, message=str(exc))
        except admin.DATABASE_ERRORS as exc:
            message = admin.database_problem(dash.engine.url, exc)
            return dash.render(request, "error.html", 503, message=message)

    return handle


def create_app(engine: AsyncEngine | None = None, *, read_only: bool = False) -> Starlette:
    """The dashboard as an ASGI app, to serve or to mount: ``app.mount("/outbox",
    create_app(engine))``.

    Without ``engine`` it opens one on the configured database and closes it on shutdown (a
    mounted app's shutdown does not run: pass your own engine there). When
    ``ROUTEMQ_OUTBOX_DASHBOARD_USER`` and ``..._PASSWORD`` are set, every request needs them
    (HTTP Basic). ``read_only`` hides and refuses every action.
    """
    owned = engine is None
    if engine is None:
        engine = create_engine(database_url())
    login = credentials()
    secret = secrets.token_bytes(32)
    dash = _Dashboard(
        engine=engine,
        read_only=read_only,
        token=hmac.new(secret, b"routemq-outbox dashboard actions", "sha256").hexdigest(),
        templates=_templates(),
    )
    routes: list[Route | Mount] = [
        Route(route.path, _guarded(dash, route.endpoint), methods=route.methods, name=route.name)
        for route in _pages(dash)
    ]
    static = StaticFiles(directory=str(files("routemq_outbox.dashboard") / "static"))
    routes.append(Mount("/static", static, name="static"))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            await dash.engine.dispose()

    app = Starlette(routes=routes, lifespan=lifespan)
    if login is not None:
        app.add_middleware(_BasicAuth, user=login[0], password=login[1])
    return app
