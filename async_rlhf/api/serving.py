"""ThreadedServer: a uvicorn server in a daemon thread (the run's API, reward servers in tests)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


class ThreadedServer:
    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        """Serve and return the URL (the real port when port=0). The socket is bound here, so an address that
        cannot be served raises OSError (its errno and text) instead of uvicorn's log line and a timeout."""
        cfg = self.server.config
        sock = bound_socket(cfg.host, cfg.port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server failed to start on {cfg.host}:{cfg.port}")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to host:port (a name, IPv4 or IPv6), as uvicorn binds its own."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock  # not inheritable (Python's default): a process started later must not keep the port
