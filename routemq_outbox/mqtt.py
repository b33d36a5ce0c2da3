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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .config import MQTT_QUEUE, max_payload_bytes, redact
from .dispatch import AsyncTarget, SyncTarget, queue
from .errors import BrokerRejected, ConfigurationError, InvalidMessage, PayloadTooLarge
from .faults import Backoff
from .job import Job

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
        await _relay().publish(self)


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

        async def deliver(
            self,
            topic: str,
            payload: bytes,
            qos: int,
            retain: bool,
            properties: Any,
            ack_timeout: float,
        ) -> Any:
            """Publish; return the reason code of the broker's acknowledgement."""
            info = self._client.publish(topic, payload, qos, retain, properties)
            if info.rc == paho.MQTT_ERR_PAYLOAD_SIZE:
                raise BrokerRejected(
                    f"the message is larger than the broker's maximum packet size "
                    f"({len(payload)} bytes of payload)"
                )
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise _Lost(paho.error_string(info.rc))
            if not info.is_published():
                acked = asyncio.get_running_loop().create_future()
                # aiomqtt's _on_publish calls set() on what waits for a message id.
                self._pending_publishes[info.mid] = _Ack(acked)  # type: ignore[assignment]
                lost = functools.partial(_lose, acked)
                self._disconnected.add_done_callback(lost)
                try:
                    await asyncio.wait_for(acked, ack_timeout)
                except TimeoutError:
                    raise _Lost(
                        f"no acknowledgement from the broker within {ack_timeout:g} s"
                    ) from None
                except _Lost:
                    self._reasons.pop(info.mid, None)
                    raise
                finally:
                    self._disconnected.remove_done_callback(lost)
                    self._pending_publishes.pop(info.mid, None)
            return self._reasons.pop(info.mid, None)

    return Client


class _Ack:
    """Resolves a future where aiomqtt would set an event: no task per publish."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _lose(acked: asyncio.Future[None], _: object) -> None:
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


class Relay:
    """One broker connection shared by every relay job of a worker process.

    While the broker is unreachable, jobs wait here for the connection (so an outage spends
    no attempts) and the connection is retried with backoff, logged once per outage.
    """

    ack_timeout = 30.0

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._down_since: float | None = None
        self._backoff = _BrokerBackoff()
        self._class = _client_class()
        self._closing: set[asyncio.Future[None]] = set()

    async def publish(self, job: MqttMessage) -> None:
        properties = _Packed(job)
        payload = job.payload
        while True:
            client = await self._connection()
            try:
                reason = await client.deliver(
                    job.topic, payload, job.qos, job.retain, properties, self.ack_timeout
                )
            except _Lost as exc:
                self._lost(client, str(exc))
                stats.retried += 1
                continue
            if reason is not None and reason.is_failure:
                stats.rejected += 1
                raise BrokerRejected(
                    f"the broker refused the message to {job.topic[:200]!r}: "
                    f"{reason.getName()} (reason code {reason.value:#04x})"
                )
            stats.published += 1
            return

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
