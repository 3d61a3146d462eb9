"""A server process on this machine, started, awaited and stopped the same way everywhere.

The demo, the tests and the benchmarks start `loopchat serve` (and vLLM's own server, and
Prometheus) with it: the command runs in its own process group with its output in a log file;
`wait_ready` polls a URL until it answers 200 and fails with the log's tail when the process
exits or the time runs out; `stop` sends SIGTERM, waits, then kills the group and any child that
left it (vLLM's engine processes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil


class ServerFailure(RuntimeError):
    """The server did not start, or died."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopchat_serve_command(python: str | Path, port: int, *args: str) -> list[str]:
    """`loopchat serve` on the loopback port, run by `python` (the environment loopchat is in)."""
    return [str(python), "-m", "loopchat.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]


class ServerProcess:
    """One server subprocess in its own process group, logging to `log_path`."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "server",
    ) -> None:
        self.command = list(command)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        # The engine processes, remembered while the parent is there to name them.
        self._children: list[psutil.Process] = []

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_file.write(("$ " + " ".join(self.command) + "\n").encode())
        self._log_file.flush()
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, url: str, *, timeout: float, interval: float = 1.0) -> float:
        """Poll `url` until it answers 200; the seconds it took. Raises ServerFailure (with the
        log's tail) when the process exits first or `timeout` passes."""
        assert self.process is not None, "not started"
        started = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if not self.alive:
                    raise ServerFailure(
                        f"{self.name} exited with status {self.process.returncode} while starting; "
                        f"log: {self.log_path}\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        break
                if time.monotonic() - started > timeout:
                    raise ServerFailure(
                        f"{self.name} not ready after {timeout:.0f} s; "
                        f"log: {self.log_path}\n{self.log_tail()}"
                    )
                self._children = self.descendants() or self._children
                time.sleep(interval)
        self._children = self.descendants() or self._children
        return time.monotonic() - started

    def descendants(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the process group and any child that
        escaped it; the exit status."""
        if self.process is None:
            return None
        process, group = self.process, self.process.pid
        self._children = self.descendants() or self._children
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                process.wait()
        # Children in the group get a few seconds to finish their own shutdown.
        deadline = time.monotonic() + min(10.0, timeout)
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for child in self._children:
            with contextlib.suppress(psutil.Error):
                if _running(child):
                    child.kill()
        # A kill is delivered asynchronously: return once the children are gone.
        deadline = time.monotonic() + 5.0
        while any(_running(child) for child in self._children) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
