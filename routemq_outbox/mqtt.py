"""The MQTT outbox: publish messages in the business transaction, relay them to the broker.

``publish()`` stores a message as a job on the queue ``"mqtt"`` in the caller's transaction,
so that it exists exactly when that transaction commits. A worker of that queue
(``routemq-outbox work -q mqtt --mqtt-url mqtt://host``) relays it: it deletes the message only
after the broker acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2), so delivery is
at-least-once. Every message carries a stable id, as the MQTT 5 user property
``message-id``, with which consumers drop the duplicates a crash or an outage may cause.

Producers need nothing but this module; only the relay needs the ``mqtt`` extra (aiomqtt).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import os
import socket
import ssl
import struct
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

from . import sql
from .config import MQTT_QUEUE, max_payload_bytes, redact
from .dispatch import AsyncTarget, SyncTarget, queue
from .errors import (
    BrokerRejected,
    ConfigurationError,
    InvalidMessage,
    JobLoadError,
    PayloadTooLarge,
    brief,
)
from .faults import Backoff
from .job import Job, decode_payload, instantiate, job_data
from .keys import job_keys

if TYPE_CHECKING:
    import aiomqtt

__all__ = [
    "ENV_MQTT_CA_FILE",
    "ENV_MQTT_URL",
    "MAX_TOPIC_BYTES",
    "MESSAGE_ID_PROPERTY",
    "QUEUE",
    "Broker",
    "MqttMessage",
    "RelayStats",
    "broker_settings",
    "bulk",
    "bulk_sync",
    "close_relay",
    "configure",
    "message",
    "publish",
    "publish_sync",
    "require_client",
    "stats",
]

log = logging.getLogger("routemq_outbox.mqtt")

QUEUE = MQTT_QUEUE
ENV_MQTT_URL = "ROUTEMQ_OUTBOX_MQTT_URL"
ENV_MQTT_CA_FILE = "ROUTEMQ_OUTBOX_MQTT_CA_FILE"
MESSAGE_ID_PROPERTY = "message-id"
MAX_TOPIC_BYTES = 65535
"""MQTT writes a topic's length in two bytes."""

_MAX_UINT32 = 2**32 - 1
_LONGEST_KEY = 200  # of 255 for a serial key, which also holds the job's name
_TEXT_PROPERTIES = ("content_type", "response_topic")
PROPERTIES = frozenset(
    {
        "content_type",
        "response_topic",
        "correlation_data",
        "message_expiry_interval",
        "payload_format_indicator",
        "user_properties",
    }
)
"""The MQTT 5 PUBLISH properties a message may set (topic aliases and subscription ids
belong to the connection, not to a stored message)."""


class MqttMessage(Job):
    """One MQTT message waiting in the outbox; the relay worker publishes it.

    Built by :func:`message` (or :func:`publish`), never by hand: the attributes are the stored
    form (the payload as UTF-8 text or base64).
    """

    job_name = "routemq_outbox.mqtt.MqttMessage"
    queue = QUEUE
    # Only a broker's refusal spends attempts: while the broker is unreachable an attempt
    # waits for it (see Relay.publish), so the timeout only bounds a publish that hangs.
    max_tries = 5
    retry_after = 5
    backoff = "exponential"
    backoff_max = 300
    timeout = 7 * 24 * 3600
    # One in flight per key, in commit order (the key defaults to the topic).
    serial_by = ("key",)

    def __init__(self) -> None:
        super().__init__()
        self.topic = ""
        self.body = ""
        self.encoding = "utf-8"  # or "base64"
        self.qos = 1
        self.retain = False
        self.properties: dict[str, Any] = {}
        self.message_id = ""
        self.key = ""  # messages with the same key are published one at a time, in order

    @property
    def payload(self) -> bytes:
        """The bytes the broker receives."""
        if self.encoding == "base64":
            return base64.b64decode(self.body)
        return self.body.encode()

    async def handle(self) -> None:
        await _relay().relay(self)


# ---------------------------------------------------------------------------- validation


def _check_topic(topic: object, what: str = "topic") -> str:
    if not isinstance(topic, str):
        raise InvalidMessage(f"MQTT {what} must be a string, got {type(topic).__name__}")
    if not topic:
        raise InvalidMessage(f"MQTT {what} must not be empty")
    wildcard = next((c for c in "+#" if c in topic), None)
    if wildcard:
        raise InvalidMessage(
            f"MQTT {what} {topic[:200]!r} contains the wildcard {wildcard!r}: wildcards are "
            "for subscriptions, a message is published to one topic"
        )
    if "\x00" in topic:
        raise InvalidMessage(f"MQTT {what} {topic[:200]!r} contains a NUL character")
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        raise InvalidMessage(
            f"MQTT {what} {topic[:200]!r} contains a lone surrogate, which UTF-8 cannot encode"
        ) from None
    if size > MAX_TOPIC_BYTES:
        raise InvalidMessage(
            f"MQTT {what} is {size} bytes of UTF-8; MQTT allows at most {MAX_TOPIC_BYTES}"
        )
    if topic.startswith("$"):
        raise InvalidMessage(
            f"MQTT {what} {topic[:200]!r} starts with '$': such topics belong to the broker"
        )
    return topic


def _encode_payload(payload: object) -> tuple[bytes, bool]:
    """The bytes of ``payload`` and whether they are JSON."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), False
    if isinstance(payload, str):
        try:
            return payload.encode(), False
        except UnicodeEncodeError:
            raise InvalidMessage(
                "MQTT payload contains a lone surrogate, which UTF-8 cannot encode"
            ) from None
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode(), True
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise InvalidMessage(
            f"MQTT payload must be bytes, str, or what JSON can hold; "
            f"{type(payload).__name__} failed: {exc}"
        ) from None


def _check_properties(properties: object) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping):
        raise InvalidMessage(f"MQTT properties must be a dict, got {type(properties).__name__}")
    stored: dict[str, Any] = {}
    for name, value in properties.items():
        if name not in PROPERTIES:
            raise InvalidMessage(
                f"unknown MQTT property {name!r}: use {', '.join(sorted(PROPERTIES))}"
            )
        if name in _TEXT_PROPERTIES:
            if name == "response_topic":
                _check_topic(value, "response_topic")
            elif not isinstance(value, str) or "\x00" in value:
                raise InvalidMessage(f"MQTT property {name} must be a string without NUL")
            stored[name] = value
        elif name == "correlation_data":
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, bytes | bytearray):
                raise InvalidMessage("MQTT property correlation_data must be bytes or str")
            stored[name] = base64.b64encode(bytes(value)).decode()
        elif name == "message_expiry_interval":
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not 0 < value <= _MAX_UINT32
            ):
                raise InvalidMessage(
                    f"MQTT property message_expiry_interval must be whole seconds from 1 to "
                    f"{_MAX_UINT32}, got {value!r:.80}"
                )
            stored[name] = value
        elif name == "payload_format_indicator":
            if value not in (0, 1) or isinstance(value, bool):
                raise InvalidMessage("MQTT property payload_format_indicator must be 0 or 1")
            stored[name] = value
        else:
            stored[name] = _check_user_properties(value)
    return stored


def _check_user_properties(value: object) -> list[list[str]]:
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(pairs, list | tuple):
        raise InvalidMessage("MQTT user_properties must be a dict or a list of (name, value)")
    checked = []
    for pair in pairs:
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        if not ok or not all(isinstance(part, str) and "\x00" not in part for part in pair):
            raise InvalidMessage(
                f"MQTT user property {pair!r:.80} must be a (name, value) pair of strings "
                "without NUL"
            )
        if pair[0] == MESSAGE_ID_PROPERTY:
            raise InvalidMessage(
                f"MQTT user property {MESSAGE_ID_PROPERTY!r} is set by the relay: it carries "
                "the message's id"
            )
        checked.append([pair[0], pair[1]])
    return checked


def message(
    topic: str,
    payload: object = b"",
    *,
    qos: int = 1,
    retain: bool = False,
    properties: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> MqttMessage:
    """A validated message for :func:`bulk`; raises :class:`InvalidMessage` or
    :class:`PayloadTooLarge` naming what is wrong.

    ``payload``: bytes as they are, str as UTF-8, anything else as UTF-8 JSON (then
    ``content_type`` defaults to ``application/json``). ``key`` (default: the topic) orders
    messages: those with the same key reach the broker one at a time, in commit order.
    """
    _check_topic(topic)
    if not isinstance(qos, int) or isinstance(qos, bool) or qos not in (0, 1, 2):
        raise InvalidMessage(f"MQTT qos must be 0, 1 or 2, got {qos!r:.80}")
    if not isinstance(retain, bool):
        raise InvalidMessage(f"MQTT retain must be True or False, got {retain!r:.80}")
    if key is not None and (not isinstance(key, str) or not key or "\x00" in key):
        raise InvalidMessage(f"MQTT key must be a non-empty string without NUL, got {key!r:.80}")
    if key is not None and not key.isascii() and _unencodable(key):
        raise InvalidMessage(f"MQTT key {key!r:.80} contains a lone surrogate")
    stored = _check_properties(properties)
    data, is_json = _encode_payload(payload)
    limit = max_payload_bytes()
    if len(data) > limit:
        raise PayloadTooLarge(
            f"MQTT payload is {len(data)} bytes; the limit is {limit} "
            "(ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES). Store large data elsewhere and send its id"
        )
    if is_json:
        stored.setdefault("content_type", "application/json")
        stored.setdefault("payload_format_indicator", 1)
    job = MqttMessage()
    job.topic = topic
    if isinstance(payload, bytes | bytearray | memoryview):
        job.body, job.encoding = base64.b64encode(data).decode(), "base64"
    else:
        job.body, job.encoding = data.decode(), "utf-8"
    job.qos = qos
    job.retain = retain
    job.properties = stored
    job.message_id = str(uuid.uuid4())
    job.key = _serial_key(key if key is not None else topic)
    return job


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _serial_key(key: str) -> str:
    """``key`` as stored for ordering: a long one by its SHA-256, so that any topic fits the
    serial key column."""
    if len(json.dumps(key, ensure_ascii=False)) > _LONGEST_KEY:
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


# ---------------------------------------------------------------------------- storing


def _rows(messages: Iterable[MqttMessage]) -> list[MqttMessage]:
    jobs = list(messages)
    for job in jobs:
        if not isinstance(job, MqttMessage):
            raise InvalidMessage(
                f"mqtt.bulk takes messages made by mqtt.message(), got {type(job).__name__}"
            )
    return jobs


async def bulk(
    messages: Iterable[MqttMessage],
    *,
    session: AsyncTarget | None = None,
    connection: str | None = None,
) -> list[str]:
    """Store many messages in one statement (all or none); returns their message ids."""
    jobs = _rows(messages)
    await queue.bulk(jobs, session=session, connection=connection)
    return [job.message_id for job in jobs]


def bulk_sync(
    messages: Iterable[MqttMessage],
    *,
    session: SyncTarget | None = None,
    connection: str | None = None,
) -> list[str]:
    """:func:`bulk` for a blocking ``Session`` / ``Connection``."""
    jobs = _rows(messages)
    queue.bulk_sync(jobs, session=session, connection=connection)
    return [job.message_id for job in jobs]


async def publish(
    topic: str,
    payload: object = b"",
    *,
    qos: int = 1,
    retain: bool = False,
    properties: Mapping[str, Any] | None = None,
    key: str | None = None,
    session: AsyncTarget | None = None,
    connection: str | None = None,
) -> str:
    """Store one message for the relay; returns its message id.

    With ``session=`` it joins the caller's transaction: the message is sent exactly when
    that transaction commits. See :func:`message` for the arguments.
    """
    job = message(topic, payload, qos=qos, retain=retain, properties=properties, key=key)
    return (await bulk([job], session=session, connection=connection))[0]


def publish_sync(
    topic: str,
    payload: object = b"",
    *,
    qos: int = 1,
    retain: bool = False,
    properties: Mapping[str, Any] | None = None,
    key: str | None = None,
    session: SyncTarget | None = None,
    connection: str | None = None,
) -> str:
    """:func:`publish` for a blocking ``Session`` / ``Connection``."""
    job = message(topic, payload, qos=qos, retain=retain, properties=properties, key=key)
    return bulk_sync([job], session=session, connection=connection)[0]


# ---------------------------------------------------------------------------- the broker


@dataclass(frozen=True)
class Broker:
    """Where the relay publishes, parsed from ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None
    url: str  # redacted: safe to print

    def __repr__(self) -> str:
        return f"Broker({self.url})"


_configured: dict[str, str | None] = {}


def configure(url: str | None = None, ca_file: str | None = None) -> Broker:
    """Set the broker of this process's relay (the worker's ``--mqtt-url``/``--mqtt-ca-file``),
    over the environment; returns it parsed, or raises :class:`ConfigurationError`."""
    broker = broker_settings(url, ca_file)
    _configured.update(url=url, ca_file=ca_file)
    return broker


def broker_settings(
    url: str | None = None,
    ca_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Broker:
    """The broker from ``url`` or ``ROUTEMQ_OUTBOX_MQTT_URL`` (``mqtt://user:pass@host:1883``,
    ``mqtts://`` for TLS with the system's CAs, or ``ca_file`` /
    ``ROUTEMQ_OUTBOX_MQTT_CA_FILE``)."""
    env = os.environ if environ is None else environ
    raw = url or env.get(ENV_MQTT_URL)
    if not raw:
        raise ConfigurationError(
            f"no MQTT broker: pass --mqtt-url or set {ENV_MQTT_URL} (e.g. mqtt://localhost:1883)"
        )
    shown = redact(raw)
    try:
        parts = urlsplit(raw)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise ConfigurationError(f"invalid MQTT URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise ConfigurationError(
            f"invalid MQTT URL {shown!r}: the scheme must be mqtt:// or mqtts:// (TLS)"
        )
    if not host:
        raise ConfigurationError(f"invalid MQTT URL {shown!r}: it names no host")
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError(f"invalid MQTT URL {shown!r}: port {port} is out of range")
    ca = ca_file or env.get(ENV_MQTT_CA_FILE) or None
    if ca is not None:
        if scheme != "mqtts":
            raise ConfigurationError(f"a CA file is for TLS: use mqtts:// instead of {shown!r}")
        if not os.path.isfile(ca):
            raise ConfigurationError(f"MQTT CA file {ca!r} does not exist")
    tls = scheme == "mqtts"
    return Broker(
        host=host,
        port=port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        ca_file=ca,
        url=shown,
    )


def require_client() -> None:
    """Raise :class:`ConfigurationError` naming the extra if aiomqtt is not installed."""
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "the MQTT relay needs aiomqtt: pip install 'routemq-outbox[mqtt]'"
        ) from None


@dataclass
class RelayStats:
    """What the relays of this process did (the worker's metrics read them)."""

    published: int = 0
    retried: int = 0  # publishes sent again: the connection was lost before the broker's ack
    rejected: int = 0
    connected: bool = False
    outages: int = 0


stats = RelayStats()


_T = TypeVar("_T")
_R = TypeVar("_R")
_Outgoing = tuple[str, bytes, int, bool, "_Packed"]  # topic, payload, qos, retain, properties


class _Lost(Exception):
    """The connection went away before the broker acknowledged the message."""


def _client_class() -> type[aiomqtt.Client]:
    require_client()
    import aiomqtt
    import paho.mqtt.client as paho

    class Client(aiomqtt.Client):
        """aiomqtt's client, keeping the reason code of each acknowledgement, which aiomqtt
        drops: a broker refuses a message by acknowledging it with a failure reason."""

        _reasons: dict[int, Any]

        def _on_publish(
            self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
        ) -> None:
            self._reasons[mid] = reason_code
            super()._on_publish(client, userdata, mid, reason_code, properties)

        async def deliver_run(self, run: list[_Outgoing], ack_timeout: float) -> list[Any]:
            """Publish ``run`` in order without waiting between messages, then wait for the
            acknowledgements: for each message, the reason code of its acknowledgement
            (None for QoS 0), a :class:`BrokerRejected` for one the client cannot send, or a
            :class:`_Lost` for one the connection lost before it was acknowledged."""
            outcomes: list[Any] = [None] * len(run)
            waiting: list[tuple[int, int, asyncio.Future[None]]] = []
            loop = asyncio.get_running_loop()
            for n, (topic, payload, qos, retain, properties) in enumerate(run):
                # paho only calls pack() on the properties.
                info = self._client.publish(topic, payload, qos, retain, properties)  # type: ignore[arg-type]
                if info.rc == paho.MQTT_ERR_PAYLOAD_SIZE:
                    outcomes[n] = BrokerRejected(
                        f"the message is larger than the broker's maximum packet size "
                        f"({len(payload)} bytes of payload)"
                    )
                elif info.rc != paho.MQTT_ERR_SUCCESS:
                    # Nothing after it may go out before it: the rest waits with it.
                    outcomes[n:] = [_Lost(paho.error_string(info.rc))] * (len(run) - n)
                    break
                elif info.is_published():
                    outcomes[n] = self._reasons.pop(info.mid, None)
                else:
                    acked = loop.create_future()
                    # aiomqtt's _on_publish calls set() on what waits for a message id.
                    self._pending_publishes[info.mid] = _Ack(acked)  # type: ignore[assignment]
                    waiting.append((n, info.mid, acked))
            if not waiting:
                return outcomes
            futures = [acked for _, _, acked in waiting]
            lost = functools.partial(_lose, futures)
            self._disconnected.add_done_callback(lost)
            try:
                await asyncio.wait(futures, timeout=ack_timeout)
            finally:
                self._disconnected.remove_done_callback(lost)
                for n, mid, acked in waiting:
                    self._pending_publishes.pop(mid, None)
                    reason = self._reasons.pop(mid, None)
                    if not acked.done():
                        outcomes[n] = _Lost(
                            f"no acknowledgement from the broker within {ack_timeout:g} s"
                        )
                    elif acked.exception() is not None:
                        outcomes[n] = acked.exception()
                    else:
                        outcomes[n] = reason
            return outcomes

    return Client


class _Ack:
    """Resolves a future where aiomqtt would set an event: no task per publish."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _lose(futures: list[asyncio.Future[None]], _: object) -> None:
    for acked in futures:
        if not acked.done():
            acked.set_exception(
                _Lost("the connection was lost before the broker acknowledged the message")
            )


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _variable_length(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Packed:
    """A message's MQTT 5 PUBLISH properties, encoded once: paho only calls ``pack()``, and
    building its ``Properties`` object costs more than the rest of a publish."""

    __slots__ = ("packed",)

    def __init__(self, job: MqttMessage) -> None:
        parts = [b"\x26" + _string(MESSAGE_ID_PROPERTY) + _string(job.message_id)]
        for name, value in job.properties.items():
            if name == "payload_format_indicator":
                parts.append(bytes((0x01, value)))
            elif name == "message_expiry_interval":
                parts.append(b"\x02" + struct.pack("!L", value))
            elif name == "content_type":
                parts.append(b"\x03" + _string(value))
            elif name == "response_topic":
                parts.append(b"\x08" + _string(value))
            elif name == "correlation_data":
                data = base64.b64decode(value)
                parts.append(b"\x09" + struct.pack("!H", len(data)) + data)
            else:  # user_properties
                parts.extend(b"\x26" + _string(k) + _string(v) for k, v in value)
        body = b"".join(parts)
        self.packed = _variable_length(len(body)) + body

    def pack(self) -> bytes:
        return self.packed


class _BrokerBackoff(Backoff):
    # Messages wait on the broker, not on a database: come back to it sooner than that.
    MAX = 5.0


class _Batched(Generic[_T, _R]):
    """Calls made while the operation runs wait and go together into its next round: one
    statement for the runs of many keys, not one each."""

    def __init__(self, operation: Callable[[list[_T]], Awaitable[_R]]) -> None:
        self._operation = operation
        self._queued: list[tuple[_T, asyncio.Future[_R]]] = []
        self._task: asyncio.Future[None] | None = None

    async def __call__(self, item: _T) -> _R:
        done: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, done))
        if self._task is None:
            self._task = asyncio.ensure_future(self._rounds())
        return await done

    async def _rounds(self) -> None:
        batch: list[tuple[_T, asyncio.Future[_R]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    result = await self._operation([item for item, _ in batch])
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(result)
        finally:
            self._task = None
            for _, done in [*batch, *self._queued]:
                done.cancel()  # only when the loop ends: a no-op on those already answered


class Relay:
    """One broker connection shared by every relay job of a worker process.

    A job holding the head of its key publishes the messages queued behind it with it, in
    order, without waiting for each acknowledgement (see :meth:`relay`).

    While the broker is unreachable, jobs wait here for the connection (so an outage spends
    no attempts) and the connection is retried with backoff, logged once per outage.
    """

    ack_timeout = 30.0
    run_limit = 1000
    """Messages of a key published at once: its head and those queued behind it."""
    run_bytes = 512 * 1024
    """Payload text a run reads from the database, at most (beyond its head)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._down_since: float | None = None
        self._backoff = _BrokerBackoff()
        self._class = _client_class()
        self._closing: set[asyncio.Future[None]] = set()
        self._read_runs = _Batched(self._key_runs)
        self._forget = _Batched(self._delete_sent)

    async def relay(self, head: MqttMessage) -> None:
        """Publish ``head``, a message this worker holds as the head of its key, and the
        messages queued behind it (up to :attr:`run_limit` of the same QoS, due, in id order),
        in order over the one connection, without waiting for each acknowledgement; then
        delete those the broker acknowledged (``head`` is the worker's to delete: that
        promotes the next message of its key).

        A follower the broker refuses stays, and becomes the key's head once ``head`` is
        deleted: it is then published again, alone, and spends attempts as any head does.
        The followers after it that the broker accepted are not held back by it. Raises
        :class:`BrokerRejected` when the broker refused ``head``.
        """
        run = [head, *await self._followers(head)]
        refused = await self._publish(run)
        accepted = [job.job_id for job, no in zip(run[1:], refused[1:], strict=True) if no is None]
        if accepted:
            try:
                await self._forget([job_id for job_id in accepted if job_id is not None])
            except Exception as exc:
                log.warning(
                    "could not delete %d messages the broker acknowledged (%s): they will be "
                    "published again",
                    len(accepted),
                    brief(exc),
                )
        if refused[0] is not None:
            raise refused[0]

    async def _followers(self, head: MqttMessage) -> list[MqttMessage]:
        """The messages queued behind ``head`` in its key that may go out with it."""
        from .worker import running_engine

        key = job_keys(head, job_data).serial_key
        if self.run_limit <= 1 or key is None or head.job_id is None or running_engine() is None:
            return []
        try:
            runs = await self._read_runs(key)
        except Exception as exc:
            log.debug("reading the messages behind a key's head failed: %s", brief(exc))
            return []
        rows = runs.get(key, [])
        if not rows or rows[0].id != head.job_id:
            return []  # not the head any more: this worker's hold on it expired
        followers: list[MqttMessage] = []
        for row in rows[1:]:
            # A run stops where order could break: at a message that is not due yet, of
            # another QoS (brokers may deliver QoS 0, 1 and 2 in different orders), or that
            # is not a plain MQTT message of the head's queue.
            if not row.due or row.queue != rows[0].queue:
                break
            try:
                name, data, _ = decode_payload(row.payload)
                job = instantiate(name, data, row.queue)
            except JobLoadError:
                break
            if not isinstance(job, MqttMessage) or job.qos != head.qos:
                break
            job.__dict__["_job_id"] = row.id
            followers.append(job)
        return followers

    async def _key_runs(self, keys: list[str]) -> dict[str, list[sql.QueuedInKey]]:
        from .worker import running_engine

        engine = running_engine()
        assert engine is not None
        async with engine.connect() as conn:
            rows = await sql.key_runs(
                conn, keys, run_limit=self.run_limit, run_bytes=self.run_bytes
            )
        runs: dict[str, list[sql.QueuedInKey]] = {}
        for row in rows:
            runs.setdefault(row.serial_key, []).append(row)
        return runs

    async def _delete_sent(self, runs: list[list[int]]) -> None:
        from .worker import running_engine

        engine = running_engine()
        assert engine is not None
        async with engine.connect() as conn:
            await sql.delete_parked(conn, [job_id for run in runs for job_id in run])

    async def _publish(self, run: list[MqttMessage]) -> list[BrokerRejected | None]:
        """Publish ``run`` in order until the broker acknowledged every message (through
        outages: the unacknowledged rest is sent again, in order, on the next connection);
        returns the broker's refusal of each, or None."""
        outgoing = [(job.topic, job.payload, job.qos, job.retain, _Packed(job)) for job in run]
        refused: list[BrokerRejected | None] = [None] * len(run)
        unsent = list(range(len(run)))
        while unsent:
            client = await self._connection()
            outcomes = await client.deliver_run([outgoing[n] for n in unsent], self.ack_timeout)
            lost: list[int] = []
            for n, outcome in zip(unsent, outcomes, strict=True):
                if isinstance(outcome, _Lost):
                    lost.append(n)
                    why = str(outcome)
                elif isinstance(outcome, BrokerRejected):
                    refused[n] = outcome
                elif outcome is not None and outcome.is_failure:
                    refused[n] = BrokerRejected(
                        f"the broker refused the message to {run[n].topic[:200]!r}: "
                        f"{outcome.getName()} (reason code {outcome.value:#04x})"
                    )
                else:
                    stats.published += 1
                    continue
                if refused[n] is not None:
                    stats.rejected += 1
            if lost:
                self._lost(client, why)
                stats.retried += len(lost)
            unsent = lost
        return refused

    async def _connection(self) -> Any:
        client = self._client
        if client is not None and not client._disconnected.done():
            return client
        async with self._lock:
            while self._client is None or self._client._disconnected.done():
                try:
                    self._client = await self._connect()
                except Exception as exc:
                    self._down(str(exc) or type(exc).__name__)
                    await asyncio.sleep(self._backoff.next())
                    continue
                self._backoff.reset()
                stats.connected = True
                if self._down_since is not None:
                    log.warning(
                        "MQTT broker %s reachable again after %.1f s",
                        self.broker.url,
                        time.monotonic() - self._down_since,
                    )
                    self._down_since = None
                else:
                    log.info("connected to MQTT broker %s", self.broker.url)
            return self._client

    async def _connect(self) -> Any:
        import aiomqtt

        tls_context = None
        if self.broker.tls:
            tls_context = ssl.create_default_context(cafile=self.broker.ca_file)
        client = self._class(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=f"routemq-outbox-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=tls_context,
            timeout=10,
            max_inflight_messages=1000,
            logger=logging.getLogger("routemq_outbox.mqtt.client"),
        )
        client._reasons = {}  # type: ignore[attr-defined]
        await client.__aenter__()
        return client

    def _down(self, reason: str) -> None:
        stats.connected = False
        if self._down_since is None:
            self._down_since = time.monotonic()
            stats.outages += 1
            log.warning(
                "MQTT broker %s unreachable (%s): messages wait, retrying the connection",
                self.broker.url,
                reason,
            )

    def _lost(self, client: Any, reason: str) -> None:
        if client is self._client:
            self._down(reason)
            self._client = None
            closing = asyncio.ensure_future(_quietly_close(client))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _quietly_close(client)
        stats.connected = False


async def _quietly_close(client: Any) -> None:
    try:
        await asyncio.wait_for(client.__aexit__(None, None, None), 5)
    except Exception as exc:
        log.debug("closing the MQTT connection: %s", exc)


_relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Relay] = weakref.WeakKeyDictionary()


def _relay() -> Relay:
    loop = asyncio.get_running_loop()
    relay = _relays.get(loop)
    if relay is None:
        broker = broker_settings(_configured.get("url"), _configured.get("ca_file"))
        relay = _relays[loop] = Relay(broker)
    return relay


async def close_relay() -> None:
    """Close this event loop's broker connection (the worker process does at exit)."""
    relay = _relays.pop(asyncio.get_running_loop(), None)
    if relay is not None:
        await relay.close()
