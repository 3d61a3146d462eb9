"""Servers the tests start as subprocesses."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_for_ready(
    process: subprocess.Popen, url: str, log: Path, timeout: float, interval: float = 1.0
) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if the process exits or the
    time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready:\n{log.read_text()[-4000:]}")
        time.sleep(interval)
