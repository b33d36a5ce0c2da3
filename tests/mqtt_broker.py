"""Real MQTT brokers for the tests: the system's Mosquitto on 127.0.0.1:1883, a private one a
test may stop and restart, and a subscriber that records what reaches it."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .conftest import free_port

SYSTEM_BROKER = "mqtt://127.0.0.1:1883"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def make_certificates(directory: Path) -> Path:
    """A CA of the test's own and a certificate it signed for 127.0.0.1; returns the CA's."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    # The extensions Python 3.13's strict verification (VERIFY_X509_STRICT) asks for.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (directory / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
            "-out", "server.pem")  # fmt: skip
    return directory / "ca.pem"


class Mosquitto:
    """A private ``mosquitto`` on a free port, from a config in ``directory``. Persistence is
    on, so that a subscriber's session (and the messages queued for it) survive a restart."""

    def __init__(
        self,
        directory: Path,
        *,
        acl: str | None = None,
        tls: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users else 'true'}",
            "user root",  # started as root (CI): keep it, to write in the temporary directory
            "persistence true",
            # Mosquitto drops QoS 1 messages past 1,000 queued for a slow subscriber.
            "max_queued_messages 0",
            f"persistence_location {directory}/",
            f"log_dest file {directory}/mosquitto.log",
        ]
        if acl is not None:
            acl_file = directory / "acl"
            acl_file.write_text(acl)
            lines.append(f"acl_file {acl_file}")
        if users:
            passwords = directory / "passwords"
            passwords.touch()
            for user, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(passwords), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.append(f"password_file {passwords}")
        if tls:
            self.ca_file = make_certificates(directory)
            lines += [
                f"cafile {self.ca_file}",
                f"certfile {directory / 'server.pem'}",
                f"keyfile {directory / 'server.key'}",
            ]
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)])
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"mosquitto did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(10)
        self.process = None


@dataclass
class Received:
    topic: str
    payload: bytes
    user: dict[str, str]
    properties: Any
    at: float = field(default_factory=time.monotonic)

    @property
    def message_id(self) -> str:
        return self.user["message-id"]


class Subscriber:
    """An MQTT 5 subscriber with a persistent session, reconnecting on its own, in a thread."""

    def __init__(self, port: int, topic: str = "#") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topic = topic
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        connect = Properties(PacketTypes.CONNECT)
        connect.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=connect)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("the subscriber could not subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        properties = getattr(message, "properties", None)
        user = dict(getattr(properties, "UserProperty", []) or [])
        with self._lock:
            self.messages.append(Received(message.topic, message.payload, user, properties))

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
