"""Network helpers shared by the roles."""

from __future__ import annotations

import socket

RAY_HEAD_PORT = 6379  # Ray's default head (GCS) port: never handed out as a free one


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now (another process may take it before the caller binds)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != RAY_HEAD_PORT:
            return port
