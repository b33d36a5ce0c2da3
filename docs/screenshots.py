"""Take the README's screenshots of the dashboard from the real page, in headless Chromium.

    python docs/screenshots.py          # writes docs/overview.png and docs/failed-job.png

It fills a throwaway SQLite database with a few queues, jobs, failed jobs and an hour of
throughput, serves ``routemq-outbox dashboard`` on a free port, and has Debian's ``chromium``
(with ``chromium-driver``; Selenium drives it) take the pictures. Needs the ``test`` extra.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from routemq_outbox import admin
from routemq_outbox.database import create_engine
from routemq_outbox.migrate import upgrade
from routemq_outbox.schema import db_minute, db_now_plus, failed_jobs, job_counts, jobs

DOCS = Path(__file__).resolve().parent
ERROR = "smtplib.SMTPRecipientsRefused: {'ops@example.com': (550, b'5.1.1 mailbox unavailable')}"
TRACEBACK = f"""{ERROR}

Traceback (most recent call last):
  File "/srv/shop/jobs.py", line 41, in handle
    await mailer.send(self.order_id, to=self.email)
  File "/srv/shop/mailer.py", line 88, in send
    response = await self._client.sendmail(sender, [to], message)
  File "/usr/lib/python3.11/smtplib.py", line 901, in sendmail
    raise SMTPRecipientsRefused(senderrs)
{ERROR}"""


async def fill(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for queue, due, later in (
                ("emails", 42, 7),
                ("invoices", 310, 0),
                ("webhooks", 5, 120),
            ):
                for i in range(due + later):
                    data = {"order_id": 1000 + i, "email": f"customer{i}@example.com"}
                    payload = json.dumps({"job": f"shop.{queue[:-1]}", "data": data})
                    ahead = 3600.0 if i >= due else -30.0 * (i % 5)
                    await conn.execute(
                        sa.insert(jobs).values(
                            queue=queue,
                            payload=payload,
                            available_at=db_now_plus(sa.literal(ahead)),
                        )
                    )
            failed = 0
            for i in range(3):
                payload = {"job": "shop.send_receipt", "data": {"order_id": 2041 + i}}
                failed = (
                    await conn.execute(
                        sa.insert(failed_jobs)
                        .values(
                            uuid=str(uuid.uuid4()),
                            connection="default",
                            queue="emails",
                            payload=json.dumps(payload),
                            exception=TRACEBACK,
                            attempts=5,
                            job_id=2041 + i,
                        )
                        .returning(failed_jobs.c.id)
                    )
                ).scalar_one()
            now = (await conn.execute(sa.select(db_minute()))).scalar_one()
            for ago in range(60):
                wave = 900 + int(400 * ((ago * 7) % 11) / 11)
                await conn.execute(
                    sa.insert(job_counts).values(
                        minute=now - ago, queue="emails", succeeded=wave, failed=(ago % 9 == 0) * 12
                    )
                )
        await admin.pause_queue(engine, "webhooks")
        return int(failed)
    finally:
        await engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/screenshots.db"
        upgrade(url)
        failed = asyncio.run(fill(url))
        port = free_port()
        server = subprocess.Popen(  # noqa: S603 - this Python, this package
            [sys.executable, "-m", "routemq_outbox", "dashboard", "--port", str(port)],
            env={**os.environ, "ROUTEMQ_OUTBOX_DATABASE_URL": url},
        )
        base = f"http://127.0.0.1:{port}"
        options = Options()
        options.binary_location = shutil.which("chromium") or "chromium"
        for argument in ("--headless=new", "--no-sandbox", "--hide-scrollbars"):
            options.add_argument(argument)
        options.add_argument("--window-size=1200,760")
        driver = webdriver.Chrome(
            options=options, service=Service(shutil.which("chromedriver") or "chromedriver")
        )
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/queues", timeout=5).close()  # noqa: S310
                    break
                except urllib.error.URLError:
                    time.sleep(0.2)
            driver.get(base + "/")
            driver.save_screenshot(str(DOCS / "overview.png"))
            driver.get(f"{base}/failed/{failed}")
            driver.save_screenshot(str(DOCS / "failed-job.png"))
        finally:
            driver.quit()
            server.terminate()
            server.wait(30)
    print(f"wrote {DOCS / 'overview.png'} and {DOCS / 'failed-job.png'}")


if __name__ == "__main__":
    main()
