"""MQTT relay throughput against a bare aiomqtt publisher, on the same broker in the same run.

Both publish QoS 1 messages of about 40 bytes and count a message when the broker has
acknowledged it. The bare publisher keeps ``--in-flight`` publishes open on one connection;
the relay is a ``routemq-outbox work -q mqtt`` process with ``--concurrency`` slots, timed
from the commit of one transaction holding every message until the outbox is empty (a message
is deleted once the broker acknowledged it). Then the latency from commit to a subscriber:
messages committed one per transaction at a steady rate::

    python -m benchmarks.mqtt_relay                       # PostgreSQL, 20,000 messages
    python -m benchmarks.mqtt_relay --quick               # 5,000
    python -m benchmarks.mqtt_relay --database-url sqlite+aiosqlite:///bench.db
    python -m benchmarks.mqtt_relay --database-url mysql://root@127.0.0.1:3306/test

Exit status 1 when a message went missing; the target (relay >= 70 % of the bare publisher)
is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import aiomqtt
import sqlalchemy as sa

from routemq_outbox import mqtt, queue
from routemq_outbox.config import async_url
from routemq_outbox.database import create_engine
from routemq_outbox.migrate import upgrade

from .harness import latency_summary

TARGET = 0.70


def database_of(url: str) -> tuple[str, str | None]:
    """A URL of a new database beside ``url`` (a file for SQLite), and its name to drop."""
    parsed = sa.make_url(async_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path(f"bench_mqtt_{os.getpid()}.db").resolve()
        return f"sqlite+aiosqlite:///{path}", None
    name = f"bench_mqtt_{os.getpid()}"
    return parsed.set(database=name).render_as_string(hide_password=False), name


async def on_server(url: str, statement: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


class Listener:
    """A subscriber to ``topic`` that notes when each message id first arrives."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.arrived: dict[str, float] = {}
        self.bodies: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiomqtt.Client(
            self.host, self.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            await client.subscribe(self.topic, qos=1)
            self.ready.set()
            async for message in client.messages:
                user = dict(getattr(message.properties, "UserProperty", None) or [])
                key = user.get(mqtt.MESSAGE_ID_PROPERTY) or bytes(message.payload).decode()  # type: ignore[arg-type]
                if key not in self.arrived:
                    self.arrived[key] = time.time()
                    self.bodies[key] = bytes(message.payload)  # type: ignore[arg-type]

    async def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.arrived) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True


async def bare(host: str, port: int, messages: int, in_flight: int) -> float:
    """Messages per second of a bare aiomqtt publisher: QoS 1, ``in_flight`` at once."""
    topic = f"bench/bare/{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(
        host, port, protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=in_flight
    ) as client:
        client.pending_calls_threshold = in_flight  # aiomqtt warns past 10 by default
        slots = asyncio.Semaphore(in_flight)

        async def one(n: int) -> None:
            async with slots:
                await client.publish(f"{topic}/{n % 20}", f"{n:08d}-{'x' * 30}", qos=1)

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(messages)))
        elapsed = time.perf_counter() - started
    return messages / elapsed


async def spawn_relay(url: str, broker: str, concurrency: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "routemq_outbox", "work", "-q", "mqtt", "--quiet",
        "--database-url", url, "--mqtt-url", broker, "--concurrency", str(concurrency),
        "--batch-size", str(min(concurrency, 1000)), "--sleep", "0.05",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def relay(
    url: str, broker: str, messages: int, concurrency: int, keys: int
) -> tuple[float, bool]:
    """Messages per second through the relay, from commit until the broker acknowledged the
    last one (the outbox is empty: a message is deleted after its acknowledgement)."""
    topic = f"bench/relay/{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    worker = await spawn_relay(url, broker, concurrency)
    try:
        # The relay runs one message per key at a time, as the order needs.
        batch = [
            mqtt.message(f"{topic}/{n % keys}", f"{n:08d}-{'x' * 30}") for n in range(messages)
        ]
        await asyncio.sleep(1.0)  # the worker is up and idle
        async with engine.begin() as conn:
            await mqtt.bulk(batch, session=conn)
        started = time.perf_counter()
        deadline = time.monotonic() + 300
        left = messages
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            async with engine.connect() as conn:
                left = await queue.size(mqtt.QUEUE, session=conn)
        elapsed = time.perf_counter() - started
    finally:
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
        await engine.dispose()
    return (messages - left) / elapsed, left == 0


async def latency(
    url: str, host: str, port: int, broker: str, messages: int, rate: float
) -> tuple[dict[str, float], bool]:
    """Commit -> subscriber receives, in ms, for messages committed one at a time."""
    topic = f"bench/latency/{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    worker = await spawn_relay(url, broker, 50)
    committed: dict[str, float] = {}
    try:
        async with Listener(host, port, f"{topic}/#") as listener:
            await asyncio.sleep(1.0)
            for n in range(messages):
                async with engine.begin() as conn:
                    message_id = await mqtt.publish(f"{topic}/{n % 20}", {"n": n}, session=conn)
                committed[message_id] = time.time()
                await asyncio.sleep(1 / rate)
            complete = await listener.wait_for(messages, 60)
    finally:
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
        await engine.dispose()
    samples = [
        (listener.arrived[key] - at) * 1000
        for key, at in committed.items()
        if key in listener.arrived
    ]
    return latency_summary(samples), complete


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200, help="relay worker slots")
    parser.add_argument(
        "--in-flight", type=int, default=200, help="bare publisher's open publishes"
    )
    parser.add_argument("--keys", type=int, default=20, help="ordering keys (topics)")
    parser.add_argument("--quick", action="store_true", help="5,000 messages")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    options = parser.parse_args()
    messages = 5_000 if options.quick else options.messages
    broker = mqtt.broker_settings(options.mqtt_url)
    url, name = database_of(options.database_url)
    server = async_url(options.database_url)
    if name is not None:
        await on_server(server, f"CREATE DATABASE {name}")
    try:
        await asyncio.to_thread(upgrade, url)
        raw_rate = await bare(broker.host, broker.port, messages, options.in_flight)
        relay_rate, complete = await relay(
            url, options.mqtt_url, messages, options.concurrency, options.keys
        )
        lat, lat_complete = await latency(
            url, broker.host, broker.port, options.mqtt_url, 200, rate=100.0
        )
    finally:
        if name is not None:
            await on_server(server, f"DROP DATABASE {name}")
        else:
            Path(sa.make_url(url).database or "").unlink(missing_ok=True)
    family = sa.make_url(url).get_backend_name()
    ratio = relay_rate / raw_rate
    print(
        f"MQTT relay on {family}, {messages} QoS 1 messages over {options.keys} keys, "
        f"broker {broker.url}"
    )
    print(f"  bare aiomqtt publisher ({options.in_flight} in flight): {raw_rate:9.0f} msg/s")
    print(f"  relay worker (--concurrency {options.concurrency}):       {relay_rate:9.0f} msg/s")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  ratio relay / bare: {ratio:.2f} (target >= {TARGET:.2f}: {verdict})")
    print(
        f"  latency commit -> subscriber (200 messages at 100/s): p50 {lat['p50_ms']:.1f} ms, "
        f"p99 {lat['p99_ms']:.1f} ms"
    )
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {
                    "backend": family,
                    "messages": messages,
                    "bare_per_s": raw_rate,
                    "relay_per_s": relay_rate,
                    "ratio": ratio,
                    "latency_ms": lat,
                },
                indent=2,
            )
        )
    return 0 if complete and lat_complete else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
