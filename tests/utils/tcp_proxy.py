"""A TCP proxy in a thread that a test can cut and restore: a database outage on demand."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class TCPProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.setblocking(False)
        self.port = self._server.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Close every open connection and refuse new ones until `restore`."""
        with self._lock:
            self._up.clear()
            for a, b in self._pairs:
                for sock in (a, b):
                    # shutdown first: close() alone does not wake a thread blocked in recv(), so
                    # the kernel socket would live on and the client would wait for an answer
                    # that never comes instead of seeing the connection drop.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
            self._pairs.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(5)
        self._server.close()

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._server, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                if key.fileobj is self._server:
                    try:
                        client, _ = self._server.accept()
                    except BlockingIOError:
                        continue
                    if not self._up.is_set():
                        client.close()
                        continue
                    try:
                        upstream = socket.create_connection(self._target, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    with self._lock:
                        if not self._up.is_set():  # cut while connecting
                            client.close()
                            upstream.close()
                            continue
                        self._pairs.append((client, upstream))
                    for a, b in ((client, upstream), (upstream, client)):
                        threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
