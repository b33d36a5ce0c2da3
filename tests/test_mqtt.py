"""The MQTT outbox against real brokers (Mosquitto) and real databases, the relay in real
worker processes."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from routemq_outbox import mqtt, queue
from routemq_outbox.database import create_sync_engine
from routemq_outbox.errors import ConfigurationError, InvalidMessage, PayloadTooLarge

from .conftest import free_port, run_cli
from .mqtt_broker import SYSTEM_BROKER, Mosquitto, Received, Subscriber
from .processes import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own on the shared broker."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(topic: str, port: int = 1883) -> Subscriber:
        subscriber = Subscriber(port, topic)
        made.append(subscriber)
        return subscriber

    yield make
    for subscriber in made:
        subscriber.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker, not started."""
    directory = tmp_path / "broker"
    directory.mkdir()
    mosquitto = Mosquitto(directory)
    yield mosquitto
    mosquitto.stop(signal.SIGKILL)


def count(url: str, table: str, where: str = "") -> int:
    engine = create_sync_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table} {where}")).scalar_one())
    finally:
        engine.dispose()


def first_seen(messages: list[Received]) -> list[Received]:
    """Each message id once, at its first arrival: what a deduplicating consumer keeps."""
    seen: set[str] = set()
    kept = []
    for message in messages:
        if message.message_id not in seen:
            seen.add(message.message_id)
            kept.append(message)
    return kept


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("a/+/b", "wildcard '+'"),
        ("a/#", "wildcard '#'"),
        ("a/\x00", "NUL"),
        ("", "must not be empty"),
        ("x" * 65536, "65536 bytes of UTF-8; MQTT allows at most 65535"),
        ("é" * 32768, "65536 bytes"),
        ("$SYS/broker", "starts with '$'"),
        ("a/\ud800", "lone surrogate"),
        (b"a/b", "must be a string"),
    ],
)
def test_bad_topics_are_refused_naming_the_problem(topic: Any, problem: str) -> None:
    with pytest.raises(InvalidMessage, match=problem.replace("$", r"\$").replace("+", r"\+")):
        mqtt.message(topic, "x")


def test_longest_topic_is_accepted() -> None:
    assert mqtt.message("x" * 65535, "x").topic == "x" * 65535


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"qos": 3}, "qos must be 0, 1 or 2"),
        ({"qos": True}, "qos must be 0, 1 or 2"),
        ({"retain": 1}, "retain must be True or False"),
        ({"key": ""}, "key must be a non-empty string"),
        ({"key": "a\ud800"}, "key 'a\\\\ud800' contains a lone surrogate"),
        ({"properties": {"colour": "red"}}, "unknown MQTT property 'colour'"),
        ({"properties": {"message_expiry_interval": -1}}, "message_expiry_interval"),
        ({"properties": {"user_properties": {"a": 1}}}, "pair of strings"),
        ({"properties": {"user_properties": {"message-id": "x"}}}, "set by the relay"),
        ({"properties": {"response_topic": "a/#"}}, "response_topic"),
        ({"properties": {"correlation_data": 5}}, "correlation_data must be bytes or str"),
        ({"properties": "content_type=x"}, "properties must be a dict"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidMessage, match=problem):
        mqtt.message("a/b", "x", **kwargs)


def test_payloads_bytes_text_and_json() -> None:
    raw = mqtt.message("a", b"\x00\xff")
    assert (raw.encoding, raw.payload) == ("base64", b"\x00\xff")
    text = mqtt.message("a", "héllo")
    assert (text.encoding, text.payload) == ("utf-8", "héllo".encode())
    document = mqtt.message("a", {"order_id": 42, "name": "é"})
    assert json.loads(document.payload) == {"order_id": 42, "name": "é"}
    assert document.properties["content_type"] == "application/json"
    with pytest.raises(InvalidMessage, match="what JSON can hold"):
        mqtt.message("a", {"when": object()})
    with pytest.raises(InvalidMessage, match="what JSON can hold"):
        mqtt.message("a", float("nan"))


def test_oversized_payload_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES", "1000")
    mqtt.message("a", b"x" * 1000)
    with pytest.raises(PayloadTooLarge, match="MQTT payload is 1001 bytes; the limit is 1000"):
        mqtt.message("a", b"x" * 1001)


def test_message_ids_are_unique_and_stable() -> None:
    ids = {mqtt.message("a", "x").message_id for _ in range(100)}
    assert len(ids) == 100


# ------------------------------------------------------------------------------ storing


async def test_publish_joins_the_callers_transaction(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await mqtt.publish("shop/orders/created", {"order_id": 42}, session=session)
        await session.rollback()
    assert await queue.size(mqtt.QUEUE) == 0
    async with AsyncSession(engine) as session, session.begin():
        message_id = await mqtt.publish("shop/orders/created", {"order_id": 42}, session=session)
        ids = await mqtt.bulk(
            [mqtt.message("a", b"\x01"), mqtt.message("b", "two", qos=2, retain=True)],
            session=session,
        )
    assert await queue.size(mqtt.QUEUE) == 3
    async with engine.connect() as conn:
        payloads = (await conn.execute(sa.text("SELECT payload FROM jobs ORDER BY id"))).scalars()
        stored = [p if isinstance(p, dict) else json.loads(p) for p in payloads]
    assert [p["data"]["message_id"] for p in stored] == [message_id, *ids]
    assert stored[2]["data"]["qos"] == 2
    assert stored[2]["data"]["retain"] is True


async def test_refused_message_stores_nothing(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(InvalidMessage):
            await mqtt.bulk([mqtt.message("a", "x"), mqtt.message("a/#", "y")], session=session)
    assert await queue.size(mqtt.QUEUE) == 0


def test_publish_sync_in_a_blocking_session(db_url: str) -> None:
    engine = create_sync_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            mqtt.publish_sync("a/b", "x", session=session)
            session.rollback()
        with Session(engine) as session, session.begin():
            mqtt.publish_sync("a/b", "x", session=session)
            mqtt.bulk_sync([mqtt.message("a/c", "y")], session=session)
    finally:
        engine.dispose()
    assert count(db_url, "jobs", "WHERE queue = 'mqtt'") == 2


# ------------------------------------------------------------------------------ the relay


def test_relay_delivers_payloads_properties_and_ids(
    db_url: str, spawn: Any, subscribe: Callable[..., Subscriber], prefix: str
) -> None:
    subscriber = subscribe(f"{prefix}/#")
    ids = mqtt.bulk_sync(
        [
            mqtt.message(f"{prefix}/json", {"order_id": 42}),
            mqtt.message(
                f"{prefix}/raw",
                b"\x01\x02",
                qos=2,
                properties={
                    "content_type": "application/octet-stream",
                    "correlation_data": b"corr",
                    "user_properties": [("tenant", "7")],
                    "message_expiry_interval": 3600,
                },
            ),
            mqtt.message(f"{prefix}/text", "hi", qos=0),
        ]
    )
    worker = spawn(db_url, "-q", "mqtt", "--mqtt-url", SYSTEM_BROKER, "--stop-when-empty")
    assert worker.wait(60) == 0, worker.log()
    wait_until(lambda: len(subscriber.received()) >= 3, 10, "three messages")
    got = {m.topic.rsplit("/", 1)[1]: m for m in subscriber.received()}
    assert json.loads(got["json"].payload) == {"order_id": 42}
    assert got["json"].properties.ContentType == "application/json"
    assert got["raw"].payload == b"\x01\x02"
    assert got["raw"].properties.CorrelationData == b"corr"
    assert got["raw"].user["tenant"] == "7"
    assert got["text"].payload == b"hi"
    assert [got[name].message_id for name in ("json", "raw", "text")] == ids
    assert count(db_url, "jobs") == 0


def test_broker_down_waits_without_spending_attempts(
    sqlite_url: str, spawn: Any, broker: Mosquitto
) -> None:
    engine = create_sync_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            ids = mqtt.bulk_sync(
                [mqtt.message(f"down/{n}", str(n)) for n in range(20)], session=conn
            )
    finally:
        engine.dispose()
    worker = spawn(sqlite_url, "-q", "mqtt", "--mqtt-url", broker.url, "--max-tries", "1")
    wait_until(lambda: "unreachable" in worker.log(), 30, "the outage logged")
    time.sleep(4)  # several reconnection attempts, each of which could have spent an attempt
    assert worker.log().count("unreachable") == 1, worker.log()
    assert count(sqlite_url, "failed_jobs") == 0
    broker.start()
    subscriber = Subscriber(broker.port, "down/#")
    try:
        wait_until(lambda: count(sqlite_url, "jobs") == 0, 60, "the messages relayed")
        wait_until(lambda: len(first_seen(subscriber.received())) == 20, 10, "every message")
    finally:
        subscriber.close()
    assert {m.message_id for m in subscriber.received()} == set(ids)
    assert "reachable again" in worker.log()
    assert count(sqlite_url, "failed_jobs") == 0


def test_broker_rejection_fails_the_message_after_its_tries(
    db_url: str, spawn: Any, tmp_path: Path
) -> None:
    strict = Mosquitto(tmp_path, acl="topic readwrite allowed/#\n")
    strict.start()
    try:
        mqtt.publish_sync("forbidden/x", "no")
        mqtt.publish_sync("allowed/x", "yes")
        worker = spawn(db_url, "-q", "mqtt", "--mqtt-url", strict.url, "--max-tries", "2")
        wait_until(lambda: count(db_url, "failed_jobs") == 1, 60, "the refused message failed")
        wait_until(lambda: count(db_url, "jobs") == 0, 10, "the other one relayed")
    finally:
        strict.stop()
    engine = create_sync_engine(db_url)
    try:
        with engine.connect() as conn:
            attempts, exception = conn.execute(
                sa.text("SELECT attempts, exception FROM failed_jobs")
            ).one()
    finally:
        engine.dispose()
    assert attempts == 2
    assert "BrokerRejected" in exception
    assert "Not authorized (reason code 0x87)" in exception
    assert "failed" in worker.log()


def test_metrics_count_what_the_relay_did(
    sqlite_url: str, spawn: Any, subscribe: Callable[..., Subscriber], prefix: str
) -> None:
    engine = create_sync_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            mqtt.bulk_sync([mqtt.message(f"{prefix}/{n}", "x") for n in range(5)], session=conn)
    finally:
        engine.dispose()
    port = free_port()
    worker = spawn(
        sqlite_url, "-q", "mqtt", "--mqtt-url", SYSTEM_BROKER, "--metrics-port", str(port)
    )
    wait_until(lambda: count(sqlite_url, "jobs") == 0, 60, "the messages relayed")

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        values = {}
        for line in text.decode().splitlines():
            if line.startswith("routemq_outbox_mqtt_"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    values = scrape()
    assert values["routemq_outbox_mqtt_published_total"] == 5, values
    assert values["routemq_outbox_mqtt_broker_connected"] == 1
    assert values["routemq_outbox_mqtt_retried_total"] == 0
    worker.kill()


# ------------------------------------------------------------------------------ the CLI


def test_cli_refuses_bad_broker_settings_without_printing_the_password(sqlite_url: str) -> None:
    base = ("work", "--database-url", sqlite_url, "--stop-when-empty")
    bad = run_cli(*base, "-q", "mqtt", "--mqtt-url", "http://user:hunter2@host")
    assert bad.returncode == 2
    assert "mqtt:// or mqtts://" in bad.stderr
    assert "hunter2" not in bad.stdout + bad.stderr
    missing = run_cli(*base, "-q", "mqtt")
    assert missing.returncode == 2
    assert "ROUTEMQ_OUTBOX_MQTT_URL" in missing.stderr
    stray = run_cli(*base, "--mqtt-url", SYSTEM_BROKER)
    assert stray.returncode == 2
    assert "-q mqtt" in stray.stderr
    ca = run_cli(*base, "-q", "mqtt", "--mqtt-url", "mqtt://h", "--mqtt-ca-file", "/nope")
    assert ca.returncode == 2
    assert "mqtts://" in ca.stderr
    good = run_cli(*base, "-q", "mqtt", "--mqtt-url", "mqtt://user:hunter2@127.0.0.1:1883")
    assert good.returncode == 0, good.stderr
    assert "hunter2" not in good.stdout + good.stderr
    assert "user:***@" in good.stderr


def test_without_the_extra_the_error_names_it(sqlite_url: str, tmp_path: Path) -> None:
    hidden = tmp_path / "no_aiomqtt"
    (hidden / "aiomqtt").mkdir(parents=True)
    (hidden / "aiomqtt" / "__init__.py").write_text("raise ImportError('aiomqtt is not here')\n")
    result = run_cli(
        "work", "--database-url", sqlite_url, "-q", "mqtt", "--mqtt-url", SYSTEM_BROKER,
        env={"PYTHONPATH": os.pathsep.join([str(hidden), *sys.path])},
    )  # fmt: skip
    assert result.returncode == 2
    assert "pip install 'routemq-outbox[mqtt]'" in result.stderr


def test_broker_settings_from_the_environment(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    env = {
        "ROUTEMQ_OUTBOX_MQTT_URL": "mqtts://me:p%40ss@broker.example",
        "ROUTEMQ_OUTBOX_MQTT_CA_FILE": str(ca),
    }
    broker = mqtt.broker_settings(environ=env)
    assert (broker.host, broker.port, broker.tls) == ("broker.example", 8883, True)
    assert (broker.username, broker.password, broker.ca_file) == ("me", "p@ss", str(ca))
    assert "p%40ss" not in repr(broker)
    assert "p@ss" not in repr(broker)
    with pytest.raises(ConfigurationError, match="names no host"):
        mqtt.broker_settings("mqtt://", environ={})


# ------------------------------------------------------------------------------ end to end


def run_producer(
    url: str,
    *,
    transactions: int,
    keys: int,
    seed: int,
    midway: Callable[[], None] | None = None,
) -> tuple[set[str], set[str]]:
    """``transactions`` transactions of one message each on ``keys`` topics, a tenth rolled
    back; each payload carries its key's commit sequence. ``midway`` is called once a third
    of them are made. Returns (committed, rolled back)."""
    rng = random.Random(seed)
    engine = create_sync_engine(url)
    committed: set[str] = set()
    rolled_back: set[str] = set()
    sequence: dict[int, int] = defaultdict(int)
    try:
        for n in range(transactions):
            if midway is not None and n == transactions // 3:
                midway()
            key = rng.randrange(keys)
            back = n % 10 == 5
            with Session(engine) as session, session.begin():
                body = {"key": key, "seq": sequence[key], "n": n}
                message_id = mqtt.publish_sync(f"e2e/{key}", body, session=session)
                if back:
                    session.rollback()
            if back:
                rolled_back.add(message_id)
            else:
                committed.add(message_id)
                sequence[key] += 1
    finally:
        engine.dispose()
    return committed, rolled_back


def assert_delivered_in_order(
    received: list[Received], committed: set[str], rolled_back: set[str]
) -> int:
    """Every committed message arrived, no rolled-back one, per key in commit order once
    duplicates are dropped. Returns the number of duplicates."""
    ids = [m.message_id for m in received]
    assert set(ids) == committed, (len(committed - set(ids)), len(set(ids) - committed))
    assert not rolled_back & set(ids)
    per_key: dict[int, list[int]] = defaultdict(list)
    for message in first_seen(received):
        body = json.loads(message.payload)
        per_key[body["key"]].append(body["seq"])
    for key, sequence in per_key.items():
        assert sequence == list(range(len(sequence))), f"key {key} out of order: {sequence}"
    return len(ids) - len(set(ids))


def test_end_to_end_in_commit_order_through_a_broker_restart(
    db_url: str, spawn: Any, broker: Mosquitto
) -> None:
    broker.start()
    subscriber = Subscriber(broker.port, "e2e/#")
    try:
        worker = spawn(db_url, "-q", "mqtt", "--mqtt-url", broker.url, "--concurrency", "20")
        stopped = threading.Event()

        def outage() -> None:
            """The broker goes down once messages flow, with two thirds still to commit: the
            relay meets the outage however fast it drains what came before."""
            wait_until(lambda: len(subscriber.received()) >= 300, 120, "messages flowing")
            broker.stop()
            stopped.set()

        with ThreadPoolExecutor(1) as pool:
            produced = pool.submit(
                run_producer, db_url, transactions=1111, keys=20, seed=1, midway=outage
            )
            wait_until(stopped.is_set, 180, "the broker stopped")
            wait_until(lambda: "unreachable" in worker.log(), 60, "the relay seeing the outage")
            broker.start()
            committed, rolled_back = produced.result()
        assert len(committed) == 1000
        wait_until(lambda: count(db_url, "jobs") == 0, 120, "every message relayed")
        wait_until(
            lambda: {m.message_id for m in subscriber.received()} >= committed,
            30,
            "every committed message received",
        )
    finally:
        subscriber.close()
    assert count(db_url, "failed_jobs") == 0
    duplicates = assert_delivered_in_order(subscriber.received(), committed, rolled_back)
    assert worker.log().count("unreachable") == 1, worker.log()  # once per outage
    print(f"duplicates around the broker restart: {duplicates}")


def test_keys_default_to_the_topic_and_long_ones_are_hashed() -> None:
    assert mqtt.message("devices/7/commands", "x").key == "devices/7/commands"
    assert mqtt.message("devices/7/commands", "x", key="7").key == "7"
    long = mqtt.message("t" * 5000, "x").key
    assert long.startswith("sha256:")
    assert long == mqtt.message("t" * 5000, "y").key != mqtt.message("t" * 4999, "x").key


@pytest.mark.slow
def test_chaos_broker_restarted_twice_and_a_relay_killed(
    pg_url: str, spawn: Any, broker: Mosquitto
) -> None:
    """5,000 messages over 20 keys while the broker is killed and restarted twice and one of
    two relay workers is SIGKILLed: nothing lost, order per key kept, duplicates counted."""
    broker.start()
    subscriber = Subscriber(broker.port, "e2e/#")
    relay = ("-q", "mqtt", "--mqtt-url", broker.url, "--concurrency", "20", "--lease", "3")
    try:
        first = spawn(pg_url, *relay)
        second = spawn(pg_url, *relay)
        with ThreadPoolExecutor(1) as pool:
            produced = pool.submit(run_producer, pg_url, transactions=5555, keys=20, seed=3)
            for threshold in (800, 2000):
                wait_until(lambda t=threshold: len(subscriber.received()) >= t, 120, "progress")
                broker.stop(signal.SIGTERM)
                time.sleep(1.5)
                broker.start()
            wait_until(lambda: len(subscriber.received()) >= 3000, 120, "progress")
            first.kill()
            committed, rolled_back = produced.result()
        assert len(committed) == 5000
        wait_until(lambda: count(pg_url, "jobs") == 0, 180, "every message relayed")
        wait_until(
            lambda: {m.message_id for m in subscriber.received()} >= committed,
            30,
            "every committed message received",
        )
    finally:
        subscriber.close()
    assert count(pg_url, "failed_jobs") == 0
    duplicates = assert_delivered_in_order(subscriber.received(), committed, rolled_back)
    # A message goes out again only because of a fault (it was in flight then): at most once
    # more per fault, of which there are three.
    copies = Counter(m.message_id for m in subscriber.received())
    assert max(copies.values()) <= 1 + 3, copies.most_common(3)
    print(f"duplicates: {duplicates} of {len(committed)}")
    second.kill()


def test_one_broker_connection_per_worker_process(
    sqlite_url: str, spawn: Any, broker: Mosquitto
) -> None:
    broker.start()
    subscriber = Subscriber(broker.port, "shared/#")
    try:
        engine = create_sync_engine(sqlite_url)
        try:
            with engine.begin() as conn:
                mqtt.bulk_sync(
                    [mqtt.message(f"shared/{n}", str(n)) for n in range(100)], session=conn
                )
        finally:
            engine.dispose()
        spawn(sqlite_url, "-q", "mqtt", "--mqtt-url", broker.url, "--concurrency", "50")
        wait_until(lambda: count(sqlite_url, "jobs") == 0, 60, "the messages relayed")
        wait_until(lambda: len(first_seen(subscriber.received())) == 100, 10, "every message")
    finally:
        subscriber.close()
    log = (broker.directory / "mosquitto.log").read_text()
    assert log.count("New client connected") == 2, log  # the subscriber and the relay
    assert log.count(" as routemq-outbox-") == 1, log


def test_stopping_during_an_outage_hands_messages_back_unspent(
    sqlite_url: str, spawn: Any, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    mqtt.publish_sync("waiting/1", "x")
    worker = spawn(sqlite_url, "-q", "mqtt", "--mqtt-url", broker.url, "--grace", "1")
    wait_until(lambda: "unreachable" in worker.log(), 30, "the outage logged")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    assert count(sqlite_url, "jobs", "WHERE attempts = 0 AND reserved_at IS NULL") == 1
    assert count(sqlite_url, "failed_jobs") == 0


def test_tls_with_a_ca_file_and_not_without(
    sqlite_url: str, spawn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    secure = Mosquitto(tmp_path, tls=True)
    secure.start()
    try:
        mqtt.publish_sync("secure/1", "x")
        # The system's CAs do not know the test's own: the certificate is refused.
        untrusting = spawn(sqlite_url, "-q", "mqtt", "--mqtt-url", secure.url, "--grace", "0")
        wait_until(lambda: "unreachable" in untrusting.log(), 30, "the refusal logged")
        assert "CERTIFICATE_VERIFY_FAILED" in untrusting.log()
        untrusting.signal(signal.SIGTERM)  # hands the message back
        assert untrusting.wait(30) == 0, untrusting.log()
        assert count(sqlite_url, "failed_jobs") == 0
        trusting = spawn(
            sqlite_url, "-q", "mqtt", "--mqtt-url", secure.url, "--mqtt-ca-file",
            str(secure.ca_file), "--stop-when-empty",
        )  # fmt: skip
        assert trusting.wait(60) == 0, trusting.log()
        assert count(sqlite_url, "jobs") == 0
        assert "connected to MQTT broker mqtts://127.0.0.1" in trusting.log()
    finally:
        secure.stop()


def test_credentials_from_the_url_and_never_printed(
    sqlite_url: str, spawn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    guarded = Mosquitto(tmp_path, users={"relay": "s3cr@t"})
    guarded.start()
    try:
        mqtt.publish_sync("guarded/1", "x")
        wrong = f"mqtt://relay:wrong-pass@127.0.0.1:{guarded.port}"
        refused = spawn(sqlite_url, "-q", "mqtt", "--mqtt-url", wrong, "--grace", "0")
        wait_until(lambda: "unreachable" in refused.log(), 30, "the refusal logged")
        time.sleep(2)  # more refused attempts: still one line
        refused.signal(signal.SIGTERM)
        assert refused.wait(30) == 0, refused.log()
        assert refused.log().count("unreachable") == 1, refused.log()
        assert "wrong-pass" not in refused.log()
        right = f"mqtt://relay:s3cr%40t@127.0.0.1:{guarded.port}"  # '@' escaped in the URL
        accepted = spawn(sqlite_url, "-q", "mqtt", "--mqtt-url", right, "--stop-when-empty", "-v")
        assert accepted.wait(60) == 0, accepted.log()
        assert count(sqlite_url, "jobs") == 0
        assert "s3cr" not in accepted.log()
        assert "relay:***@127.0.0.1" in accepted.log()
    finally:
        guarded.stop()


# ------------------------------------------------------------------------------ runs of a key


def store(url: str, messages: list[mqtt.MqttMessage]) -> list[str]:
    """Commit ``messages`` in one transaction: all but the first of a key wait behind it."""
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            return mqtt.bulk_sync(messages, session=conn)
    finally:
        engine.dispose()


def test_a_keys_queued_messages_go_out_with_its_head_in_order(
    db_url: str, spawn: Any, subscribe: Callable[..., Subscriber], prefix: str
) -> None:
    """Three keys of 150 messages each, QoS changing within one: every message once, in
    order per key; the relay ran one job per key and QoS run, not one per message."""
    subscriber = subscribe(f"{prefix}/#")
    qos_of = [1] * 50 + [0] * 50 + [1] * 50  # key "mixed": three runs
    messages = [
        mqtt.message(
            f"{prefix}/{key}", {"key": key, "seq": seq}, qos=qos_of[seq] if key == 2 else 1
        )
        for seq in range(150)
        for key in range(3)
    ]
    ids = store(db_url, messages)
    worker = spawn(db_url, "-q", "mqtt", "--mqtt-url", SYSTEM_BROKER, "--stop-when-empty", "-v")
    assert worker.wait(120) == 0, worker.log()
    wait_until(lambda: len(subscriber.received()) >= 450, 30, "every message")
    received = subscriber.received()
    assert sorted(m.message_id for m in received) == sorted(ids)  # each once
    per_key: dict[int, list[int]] = defaultdict(list)
    for message in received:
        body = json.loads(message.payload)
        per_key[body["key"]].append(body["seq"])
    assert per_key == {key: list(range(150)) for key in range(3)}
    assert worker.log().count(" succeeded in ") == 1 + 1 + 3, worker.log()
    assert count(db_url, "jobs") == 0


def test_a_refused_message_in_a_run_fails_alone_and_holds_back_nothing_accepted(
    db_url: str, spawn: Any, tmp_path: Path
) -> None:
    """A refused head and a refused follower: each goes to failed_jobs after its tries; the
    accepted messages around them arrive once each, in order."""
    strict = Mosquitto(tmp_path, acl="topic readwrite allowed/#\n")
    strict.start()
    subscriber = Subscriber(strict.port, "allowed/#")
    try:
        topics = ["forbidden/a", "allowed/1", "allowed/2", "forbidden/b", "allowed/3"]
        store(db_url, [mqtt.message(topic, topic, key="device-7") for topic in topics])
        worker = spawn(db_url, "-q", "mqtt", "--mqtt-url", strict.url, "--max-tries", "2")
        wait_until(lambda: count(db_url, "jobs") == 0, 60, "every message relayed or failed")
        wait_until(lambda: len(subscriber.received()) >= 3, 10, "the accepted messages")
        time.sleep(0.5)  # a duplicate would arrive meanwhile
        received = [m.topic for m in subscriber.received()]
    finally:
        subscriber.close()
        strict.stop()
    assert received == ["allowed/1", "allowed/2", "allowed/3"]
    engine = create_sync_engine(db_url)
    try:
        with engine.connect() as conn:
            failed = conn.execute(
                sa.text("SELECT attempts, payload FROM failed_jobs ORDER BY job_id")
            ).all()
    finally:
        engine.dispose()
    assert [attempts for attempts, _ in failed] == [2, 2]
    assert ["forbidden/a" in str(p) for _, p in failed] == [True, False]
    assert "forbidden/b" in str(failed[1][1])
    assert "failed" in worker.log()


def test_a_connection_lost_mid_run_sends_the_unacknowledged_rest_again_in_order(
    db_url: str, spawn: Any, broker: Mosquitto
) -> None:
    """The broker stops while runs of one key are in flight: nothing is lost, the order
    holds once duplicates are dropped, no attempt is spent. (Stopped, not killed: a killed
    broker loses what it acknowledged but had not saved, which no relay can help.)"""
    broker.start()
    subscriber = Subscriber(broker.port, "e2e/#")
    try:
        messages = [mqtt.message("e2e/0", {"key": 0, "seq": seq}) for seq in range(10_000)]
        committed = set(store(db_url, messages))
        worker = spawn(db_url, "-q", "mqtt", "--mqtt-url", broker.url, "--max-tries", "1")
        wait_until(lambda: len(subscriber.received()) >= 300, 60, "messages flowing")
        broker.stop()
        time.sleep(1)
        broker.start()
        wait_until(lambda: count(db_url, "jobs") == 0, 120, "every message relayed")
        wait_until(
            lambda: {m.message_id for m in subscriber.received()} >= committed,
            30,
            "every message received",
        )
    finally:
        subscriber.close()
    assert count(db_url, "failed_jobs") == 0
    duplicates = assert_delivered_in_order(subscriber.received(), committed, set())
    assert "unreachable" in worker.log()
    print(f"duplicates around the lost connection: {duplicates}")
