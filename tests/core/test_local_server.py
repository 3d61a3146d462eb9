"""The server process helper the demo, the tests and the benchmarks start servers with."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from loopchat.local_server import ServerFailure, ServerProcess, free_port

# A server that first starts a long-lived child (as vLLM's engine core is), writes its pid, then
# answers HTTP on the port it is given.
SERVER_WITH_CHILD = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[2], "w").write(str(child.pid))
handler = http.server.SimpleHTTPRequestHandler
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


def test_a_server_is_awaited_then_stopped_with_its_children(tmp_path: Path) -> None:
    port, pid_file = free_port(), tmp_path / "child.pid"
    server = ServerProcess(
        [sys.executable, "-c", SERVER_WITH_CHILD, str(port), str(pid_file)],
        log_path=tmp_path / "logs" / "server.log",
        cwd=tmp_path,
        name="http",
    ).start()
    try:
        took = server.wait_ready(f"http://127.0.0.1:{port}/", timeout=30, interval=0.05)
        assert 0 <= took < 30 and server.alive
        child = psutil.Process(int(pid_file.read_text()))
        assert child.is_running()
    finally:
        status = server.stop(timeout=2)
    assert status is not None and not server.alive
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    # The log starts with the command, as typed.
    assert (tmp_path / "logs" / "server.log").read_text().startswith(f"$ {sys.executable} -c")


def test_a_server_that_exits_while_starting_fails_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('cannot bind: port in use'); sys.exit(3)"
    server = ServerProcess([sys.executable, "-c", script], log_path=tmp_path / "s.log", name="broken").start()
    with pytest.raises(ServerFailure, match=r"broken exited with status 3(.|\n)*cannot bind"):
        server.wait_ready(f"http://127.0.0.1:{free_port()}/", timeout=30, interval=0.05)
    assert server.stop() == 3


def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path: Path) -> None:
    # Ignores SIGTERM, so `stop` must fall back to killing its process group.
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    server = ServerProcess([sys.executable, "-c", script], log_path=tmp_path / "s.log", name="mute").start()
    began = time.monotonic()
    with pytest.raises(ServerFailure, match="mute not ready after 1 s"):
        server.wait_ready(f"http://127.0.0.1:{free_port()}/", timeout=1, interval=0.05)
    assert server.alive
    assert server.stop(timeout=1) == -9
    assert time.monotonic() - began < 30
