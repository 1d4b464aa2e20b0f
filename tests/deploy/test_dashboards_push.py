"""``kvferry dashboards push`` against a local HTTP server that answers like Grafana's API.

The server (stdlib ``http.server`` on 127.0.0.1, a port the OS picks) records every request
and answers the three endpoints push uses: ``GET /api/folders``, ``POST /api/folders`` and
``POST /api/dashboards/db``. The requests go through grafana-client and a real socket.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cluster.cli import app

ROOT = Path(__file__).resolve().parents[2]
UIDS = ["kvferry-pools", "kvferry-prompt-cache", "kvferry-kv-transfer"]
TOKEN = "glsa_test_token_123"


@dataclass
class FakeGrafana:
    """What the server has, what it received, and an optional failure to answer with."""

    folders: list[dict[str, Any]] = field(default_factory=list)
    received: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    fail: tuple[str, int, str] | None = None  # (path prefix, status, message)
    url: str = ""

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.fail and path.startswith(self.fail[0]):
            return self.fail[1], {"message": self.fail[2]}
        if (method, path) == ("GET", "/api/folders"):
            return 200, self.folders
        if (method, path) == ("POST", "/api/folders"):
            folder = {"id": len(self.folders) + 1, "uid": f"f{len(self.folders) + 1}", "title": body["title"]}
            self.folders.append(folder)
            return 200, folder
        if (method, path) == ("POST", "/api/dashboards/db"):
            uid = body["dashboard"]["uid"]
            return 200, {"id": 7, "uid": uid, "url": f"/d/{uid}/x", "status": "success", "version": 1}
        return 404, {"message": "Not found"}

    def calls(self, method: str, path: str) -> list[tuple[dict[str, str], Any]]:
        return [(h, b) for m, p, h, b in self.received if (m, p) == (method, path)]


def _handler(grafana: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            path = self.path.split("?", 1)[0]
            grafana.received.append((self.command, path, dict(self.headers), body))
            status, answer = grafana.answer(self.command, path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:  # keep pytest's output clean
            pass

    return Handler


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _push(grafana_url: str, *extra: str) -> Any:
    return CliRunner().invoke(app, ["dashboards", "push", "--url", grafana_url, "--token", TOKEN, *extra])


def test_push_creates_the_folder_and_saves_each_dashboard_once(grafana: FakeGrafana) -> None:
    res = _push(grafana.url)
    assert res.exit_code == 0, res.output
    assert [b for _, b in grafana.calls("POST", "/api/folders")] == [{"title": "kvferry"}]
    saved = grafana.calls("POST", "/api/dashboards/db")
    assert [b["dashboard"]["uid"] for _, b in saved] == UIDS
    for headers, body in saved:
        assert body["overwrite"] is True and body["folderUid"] == "f1"
        assert "id" not in body["dashboard"]
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h, _ in grafana.received)
    for uid in UIDS:
        assert f"pushed {uid} /d/{uid}/x" in res.output


def test_push_reuses_an_existing_folder_by_title(grafana: FakeGrafana) -> None:
    grafana.folders = [{"id": 1, "uid": "other", "title": "Other"}, {"id": 2, "uid": "ops", "title": "Ops"}]
    res = _push(grafana.url, "--folder", "Ops")
    assert res.exit_code == 0, res.output
    assert grafana.calls("POST", "/api/folders") == []
    assert {b["folderUid"] for _, b in grafana.calls("POST", "/api/dashboards/db")} == {"ops"}


def test_push_to_general_skips_the_folder(grafana: FakeGrafana) -> None:
    res = _push(grafana.url, "--folder", "")
    assert res.exit_code == 0, res.output
    assert grafana.calls("GET", "/api/folders") == []
    assert all("folderUid" not in b for _, b in grafana.calls("POST", "/api/dashboards/db"))


def test_a_refused_token_exits_1_with_a_clear_message(grafana: FakeGrafana) -> None:
    grafana.fail = ("/api/", 401, "invalid API key")
    res = _push(grafana.url)
    assert res.exit_code == 1
    assert "401" in res.output and "--token" in res.output and grafana.url in res.output
    assert grafana.calls("POST", "/api/dashboards/db") == []


def test_a_server_error_exits_1_and_names_the_dashboard(grafana: FakeGrafana) -> None:
    grafana.fail = ("/api/dashboards/db", 500, "database is locked")
    res = _push(grafana.url)
    assert res.exit_code == 1
    assert "saving dashboard kvferry-pools" in res.output and "database is locked" in res.output
    assert len(grafana.calls("POST", "/api/dashboards/db")) == 1  # stops at the first failure


def test_an_unreachable_grafana_exits_1_without_a_traceback() -> None:
    # A port nothing listens on: bind one, close it, then push there in a real process.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "dashboards", "push", "--url", f"http://127.0.0.1:{port}",
         "--token", TOKEN, "--timeout", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "could not reach Grafana" in out.stderr and "Connection refused" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
