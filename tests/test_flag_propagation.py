"""A flag change reaches every server process and every live session within a second.

Two server processes share PostgreSQL and Redis (the production shape); the flag is rolled
back through one, and the other's live session and requests see it at once. Needs both
services, so it runs in the PostgreSQL + Redis configuration.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from websockets.sync.client import connect as ws_connect

from tests.live import Browserless, LiveServer, serving

pytestmark = pytest.mark.skipif(
    not (
        os.environ.get("REDIS_URL")
        and os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))
    ),
    reason="needs PostgreSQL and Redis shared by two server processes",
)

PROPAGATION_SECONDS = 1.0


def flags(server: LiveServer, *args: str) -> None:
    """Run ``manage.py flags ...`` against the server's database, as an operator would."""
    server.manage("flags", *args)


def test_a_rollback_in_one_process_reaches_the_other_within_a_second(tmp_path):
    with serving(tmp_path / "one") as one:
        (tmp_path / "two").mkdir()
        two = LiveServer(tmp_path / "two")
        for shared in ("DATABASE_URL", "REDIS_URL", "TERMSYS_REDIS_PREFIX"):
            two.env[shared] = one.env[shared]  # the same database and Redis keys
        two.start()
        try:
            flags(one, "enable", "storage_hybrid", "--reason", "canary")
            client = Browserless(two)
            client.login()
            status, body = client.api("POST", "/api/projects", {"name": "propagation"})
            assert status == 201, body
            status, body = client.api(
                "POST", "/api/terminal/create", {"projectId": body["project"]["id"]}
            )
            assert status == 201 and body["session"]["mode"] == "HYBRID", body
            url = two.url.replace("http://", "ws://") + body["connectionUrl"]
            headers = {**client.ws_headers(), "Origin": two.url}
            with ws_connect(url, additional_headers=headers) as ws:
                hello = json.loads(ws.recv(timeout=10))
                assert hello["mode"] == "HYBRID"

                flags(one, "rollback", "storage_hybrid", "--reason", "errors in HYBRID")
                rolled_back = time.monotonic()
                mode = None
                while mode is None:
                    remaining = PROPAGATION_SECONDS - (time.monotonic() - rolled_back)
                    assert remaining > 0, "the live session in the other process kept HYBRID"
                    frame = ws.recv(timeout=remaining)
                    if isinstance(frame, str) and json.loads(frame).get("type") == "mode":
                        mode = json.loads(frame)["mode"]
                assert mode == "DATABASE"

            status, body = client.api(
                "POST", "/api/terminal/create", {"projectId": body["session"]["projectId"]}
            )
            assert status == 201 and body["session"]["mode"] == "DATABASE", body
        finally:
            two.stop()
