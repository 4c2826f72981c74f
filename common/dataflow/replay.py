"""A Redis-backed replay buffer of rollout-group records, shared by every rollout worker and the learner.

Guarantees (what an operator can rely on)
-----------------------------------------
* Nothing is evicted. An insert into a full buffer is refused (`BufferFull`, replay.on_full=error) or
  waits for room (replay.on_full=wait); Redis itself runs with `maxmemory-policy noeviction`, so at
  its memory cap a write fails with `ReplayMemoryError` instead of silently dropping data. Items leave
  the buffer only by three stated policies, each counted: retirement after replay.max_times_sampled
  samples (`retired`), quarantine of an item that fails to decode (`corrupt`), and `clear()`.
* An item is all or nothing. Its record bytes are written first, as parts; one atomic Lua script (the
  equivalent of a MULTI/EXEC that also checks the capacity, so two inserters cannot both take the last
  slot) then publishes it. A crash in between leaves orphan parts, never a half item: readers only see
  ids in the index, and `collect_garbage()` removes the orphans.
* Nothing is unpickled. Items are `RolloutGroup.to_bytes()` records (JSON header + safetensors +
  blake2b digest, keyed with an HMAC key when the buffer has one); bytes that fail to decode, whatever
  they contain, are quarantined and never returned.
* Counters live in Redis (a hash), so they survive restarts and every client sees the same numbers.
* Every Redis call goes through one retry helper: connection errors and timeouts are retried with
  exponential backoff for up to `retry_timeout_s` (default 30 s), so a Redis restart is survived and a
  write is retried, not dropped. Retried writes are idempotent: ids are reserved before anything is
  written, parts are plain SETs, and publishing or claiming a sample leaves a one-hour marker, so a
  script that ran but whose reply was lost is not applied twice.
* Durability is Redis's: with the embedded server's AOF (`appendfsync everysec`), a Redis restart or
  crash loses nothing it acknowledged; an operating-system crash can lose the last second.

Key layout (prefix P = "arcopo:<name>:"; ids are decimal integers from INCR)
---------------------------------------------------------------------------
    P next_id                  string  INCR counter; ids are monotonic, gaps are harmless
    P index                    zset    published item ids, score = id: membership = "in the buffer"
    P sampled                  zset    same ids, score = times sampled, member = id zero-padded to 20
                                       digits (so ties sort by id): the fifo order
    P item:<id>                hash    meta: parts, length, times_sampled, policy_version, adapter,
                                       prompt, group_id, inserted_at (unix seconds); retired=1 while an
                                       item retired by sample_ids lingers (meta and parts then carry a
                                       TTL of retired_linger_s, so the ranks can still get() it)
    P item:<id>:part:<k>       string  record bytes [k*max_value_bytes, (k+1)*max_value_bytes)
    P item:<id>:done           string  publish marker (1 h TTL): makes a retried publish a no-op
    P claim:<token>            string  sample-claim marker (1 h TTL): makes a retried claim a no-op
    P pending                  hash    id -> "<unix time> <parts>" for reserved, unpublished ids (GC)
    P quarantine               zset    ids of items that failed to decode; meta and parts kept for
                                       inspection until `purge_quarantine()`
    P stats                    hash    inserts, samples, retired, corrupt, refused_full, rate_limited,
                                       cleared, bytes (record bytes of the published items)

Scripts build keys from the prefix, so this needs a standalone Redis (or one cluster hash slot).
Huge values block Redis (it runs commands on one thread); replay.max_value_bytes bounds one value.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import redis.backoff
import redis.retry

from common.dataflow.records import RecordError, RolloutGroup

log = logging.getLogger(__name__)
T = TypeVar("T")

_MARKER_TTL_MS = 3_600_000  # publish/claim markers outlive any retry window by far
_COUNTERS = ("inserts", "samples", "retired", "corrupt", "refused_full", "rate_limited", "cleared", "bytes")
_META_FIELDS = ("policy_version", "adapter", "prompt", "group_id")


class ReplayError(RuntimeError):
    """Base of every replay-buffer error; messages name the replay.* setting involved."""


class BufferFull(ReplayError):
    """An insert found the buffer at replay.capacity (and replay.on_full=error, or the wait timed out)."""


class NotEnoughData(ReplayError):
    """A sample asked for more than the buffer can give (replay.min_size_to_sample, fifo size)."""


class RateLimited(ReplayError):
    """A sample would exceed replay.samples_per_insert * inserts + replay.samples_per_insert_error."""


class ReplayMemoryError(ReplayError):
    """Redis refused a write at its maxmemory cap (policy noeviction: nothing was evicted)."""


class ReplayUnavailable(ReplayError):
    """Redis stayed unreachable for longer than the retry budget, or refused our credentials."""


class ItemNotFound(ReplayError):
    """No published item has this id (never inserted, retired, quarantined or cleared)."""


class CorruptItem(ReplayError):
    """An item's bytes failed to decode; it was quarantined and counted as corrupt."""


# Scripts. In Redis < 7 a script hitting maxmemory fails at its first memory-using write, before it
# changed anything; so each script's first write is such a command (HSET/HINCRBY/SET), keeping it atomic.

_RESERVE = """
local p = ARGV[1]
local id = redis.call('INCR', p .. 'next_id')
redis.call('HSET', p .. 'pending', id, ARGV[2] .. ' 0')
return id
"""

_PUBLISH = (
    """
local p, id = ARGV[1], ARGV[2]
local cap, nparts, len = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local item = p .. 'item:' .. id
if redis.call('EXISTS', item .. ':done') == 1 then return 'dup' end
local total = 0
for k = 0, nparts - 1 do
  local n = redis.call('STRLEN', item .. ':part:' .. k)
  if n == 0 then return 'missing' end
  total = total + n
end
if total ~= len then return 'missing' end
if redis.call('ZCARD', p .. 'index') >= cap then return 'full' end
redis.call('HSET', item, 'parts', nparts, 'length', len, 'times_sampled', 0, unpack(ARGV, 6))
redis.call('SET', item .. ':done', '1', 'PX', %d)
redis.call('ZADD', p .. 'index', id, id)
redis.call('ZADD', p .. 'sampled', 0, string.format('%%020d', id))
redis.call('HDEL', p .. 'pending', id)
redis.call('HINCRBY', p .. 'stats', 'inserts', 1)
redis.call('HINCRBY', p .. 'stats', 'bytes', len)
return 'ok'
"""
    % _MARKER_TTL_MS
)

# ARGV: prefix, token, max_times_sampled, samples_per_insert ('' = off), error, n, linger ms, then id, count
# pairs. A retired item leaves the index at once; with linger > 0 its meta and parts expire after linger ms
# (so ranks can still get() an id from sample_ids), else they are deleted now.
_CLAIM = (
    """
local p, token = ARGV[1], ARGV[2]
local cap, spi, err, n = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local linger = tonumber(ARGV[7])
if redis.call('EXISTS', p .. 'claim:' .. token) == 1 then return {'dup'} end
for i = 8, #ARGV, 2 do
  local ts = redis.call('HGET', p .. 'item:' .. ARGV[i], 'times_sampled')
  if not ts or not redis.call('ZSCORE', p .. 'index', ARGV[i]) then return {'gone', ARGV[i]} end
  if cap > 0 and tonumber(ts) + tonumber(ARGV[i + 1]) > cap then return {'conflict', ARGV[i]} end
end
if spi ~= '' then
  local s = tonumber(redis.call('HGET', p .. 'stats', 'samples') or '0')
  local ins = tonumber(redis.call('HGET', p .. 'stats', 'inserts') or '0')
  if s + n > tonumber(spi) * ins + err then
    redis.call('HINCRBY', p .. 'stats', 'rate_limited', 1)
    return {'rate', tostring(s), tostring(ins)}
  end
end
redis.call('HINCRBY', p .. 'stats', 'samples', n)
redis.call('SET', p .. 'claim:' .. token, '1', 'PX', %d)
local retired = 0
for i = 8, #ARGV, 2 do
  local id = ARGV[i]
  local item = p .. 'item:' .. id
  local ts = redis.call('HINCRBY', item, 'times_sampled', tonumber(ARGV[i + 1]))
  redis.call('ZADD', p .. 'sampled', 'XX', ts, string.format('%%020d', id))
  if cap > 0 and ts >= cap then
    local meta = redis.call('HMGET', item, 'parts', 'length')
    if linger > 0 then
      redis.call('HSET', item, 'retired', '1')
      redis.call('PEXPIRE', item, linger)
      for k = 0, tonumber(meta[1] or '0') - 1 do redis.call('PEXPIRE', item .. ':part:' .. k, linger) end
    else
      for k = 0, tonumber(meta[1] or '0') - 1 do redis.call('DEL', item .. ':part:' .. k) end
      redis.call('DEL', item)
    end
    redis.call('ZREM', p .. 'index', id)
    redis.call('ZREM', p .. 'sampled', string.format('%%020d', id))
    redis.call('HINCRBY', p .. 'stats', 'retired', 1)
    redis.call('HINCRBY', p .. 'stats', 'bytes', -tonumber(meta[2] or '0'))
    retired = retired + 1
  end
end
return {'ok', tostring(retired)}
"""
    % _MARKER_TTL_MS
)

_QUARANTINE = """
local p, id = ARGV[1], ARGV[2]
if not redis.call('ZSCORE', p .. 'index', id) then return 0 end
local len = tonumber(redis.call('HGET', p .. 'item:' .. id, 'length') or '0') or 0
redis.call('HINCRBY', p .. 'stats', 'corrupt', 1)
redis.call('HINCRBY', p .. 'stats', 'bytes', -len)
redis.call('ZREM', p .. 'index', id)
redis.call('ZREM', p .. 'sampled', string.format('%020d', id))
redis.call('ZADD', p .. 'quarantine', id, id)
return 1
"""

# Drops an unpublished id's parts, unless it was published (or quarantined) meanwhile.
_DROP_UNPUBLISHED = """
local p, id, nparts = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('ZSCORE', p .. 'index', id) or redis.call('ZSCORE', p .. 'quarantine', id) then
  redis.call('HDEL', p .. 'pending', id)
  return 0
end
local n = 0
for k = 0, nparts - 1 do n = n + redis.call('DEL', p .. 'item:' .. id .. ':part:' .. k) end
redis.call('HDEL', p .. 'pending', id)
return n
"""

# Deletes one part key found by SCAN when its id has no meta (published, quarantined and lingering retired
# items have one) and is neither published, quarantined nor pending.
_DROP_ORPHAN_PART = """
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'item:' .. id) == 1 or redis.call('ZSCORE', p .. 'index', id)
   or redis.call('ZSCORE', p .. 'quarantine', id) or redis.call('HEXISTS', p .. 'pending', id) == 1 then
  return 0
end
return redis.call('DEL', KEYS[1])
"""

# Removes published items (meta + parts), a batch at a time.
_CLEAR = """
local p, batch = ARGV[1], tonumber(ARGV[2])
local ids = redis.call('ZRANGE', p .. 'index', 0, batch - 1)
local bytes = 0
for _, id in ipairs(ids) do
  local item = p .. 'item:' .. id
  local meta = redis.call('HMGET', item, 'parts', 'length')
  for k = 0, (tonumber(meta[1] or '0') or 0) - 1 do redis.call('DEL', item .. ':part:' .. k) end
  redis.call('DEL', item)
  redis.call('ZREM', p .. 'index', id)
  redis.call('ZREM', p .. 'sampled', string.format('%020d', id))
  bytes = bytes + (tonumber(meta[2] or '0') or 0)
end
if #ids > 0 then
  redis.call('HINCRBY', p .. 'stats', 'cleared', #ids)
  redis.call('HINCRBY', p .. 'stats', 'bytes', -bytes)
end
return #ids
"""


def _oom_message(exc: Exception) -> str:
    return (
        "Redis refused the write: out of memory (its maxmemory cap, replay.maxmemory_mb, is reached; "
        "policy noeviction, so nothing was evicted). Raise replay.maxmemory_mb, lower replay.capacity "
        f"or replay.max_times_sampled, or clear items. Redis said: {exc}"
    )


class ReplayBuffer:
    """Rollout groups in Redis under the key prefix `arcopo:<name>:` (layout in the module docstring).

    Any number of ReplayBuffer objects, in any processes, may share one name: all state is in Redis.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        key: bytes | None = None,
        capacity: int = 100,
        on_full: str = "error",
        wait_timeout_s: float | None = None,
        sampling: str = "uniform",
        max_times_sampled: int = 0,
        samples_per_insert: float | None = None,
        samples_per_insert_error: float = 100.0,
        min_size_to_sample: int = 1,
        max_value_bytes: int = 4 << 20,
        retry_timeout_s: float = 30.0,
        socket_timeout_s: float = 60.0,
        retired_linger_s: float = 600.0,
        password: str | None = None,
    ):
        if not name or any(c in name for c in ": \t\r\n*?[]"):
            raise ReplayError(
                f"replay buffer name must be non-empty without ':', spaces or glob characters, got {name!r}"
            )
        checks = [
            (capacity >= 1, f"replay.capacity must be >= 1, got {capacity}"),
            (on_full in ("error", "wait"), f"replay.on_full must be 'error' or 'wait', got {on_full!r}"),
            (sampling in ("uniform", "fifo"), f"replay.sampling must be 'uniform' or 'fifo', got {sampling!r}"),
            (max_times_sampled >= 0, f"replay.max_times_sampled must be >= 0, got {max_times_sampled}"),
            (
                samples_per_insert is None or samples_per_insert > 0,
                f"replay.samples_per_insert must be > 0 or None, got {samples_per_insert}",
            ),
            (
                samples_per_insert_error >= 0,
                f"replay.samples_per_insert_error must be >= 0, got {samples_per_insert_error}",
            ),
            (min_size_to_sample >= 1, f"replay.min_size_to_sample must be >= 1, got {min_size_to_sample}"),
            (max_value_bytes >= 1, f"replay.max_value_bytes must be >= 1, got {max_value_bytes}"),
            (retry_timeout_s >= 0, f"retry_timeout_s must be >= 0, got {retry_timeout_s}"),
            (retired_linger_s > 0, f"retired_linger_s must be > 0, got {retired_linger_s}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ReplayError(message)
        if key is not None and not (isinstance(key, bytes) and 1 <= len(key) <= 64):
            raise ReplayError("the replay record key must be 1 to 64 bytes or None")
        self.name = name
        self.prefix = f"arcopo:{name}:"
        self.key = key
        self.capacity = capacity
        self.on_full = on_full
        self.wait_timeout_s = wait_timeout_s
        self.last_insert_bytes = 0  # size of the last inserted record (rollout workers report it)
        self.sampling = sampling
        self.max_times_sampled = max_times_sampled
        self.samples_per_insert = samples_per_insert
        self.samples_per_insert_error = samples_per_insert_error
        self.min_size_to_sample = min_size_to_sample
        self.max_value_bytes = max_value_bytes
        self.retry_timeout_s = retry_timeout_s
        self.retired_linger_s = retired_linger_s
        kw = {"password": password} if password is not None else {}
        # from_url handles rediss:// (TLS) and its ssl_* query parameters. The client's own retry is off:
        # all retrying is ours (one budget, one place).
        self._r = redis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=min(5.0, socket_timeout_s),
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            **kw,
        )
        self._where = self._describe(url)
        s = self._r.register_script
        self._reserve, self._publish, self._claim = s(_RESERVE), s(_PUBLISH), s(_CLAIM)
        self._quarantine_script, self._drop_unpublished = s(_QUARANTINE), s(_DROP_UNPUBLISHED)
        self._drop_orphan, self._clear = s(_DROP_ORPHAN_PART), s(_CLEAR)

    @classmethod
    def from_config(cls, replay_cfg, url: str | None, name: str, key: bytes | None = None, **kw) -> ReplayBuffer:
        """A buffer with the settings of a `common.config.ReplayConfig` (url=None: replay.redis_url).

        A URL with a password of its own (the job's actors get one from the driver, which read
        replay.redis_password / _env / _file where it runs) is used as it is; otherwise the password is
        read here (`ReplayConfig.resolve_password`)."""
        url = url or replay_cfg.redis_url
        if not url:
            raise ReplayError("no Redis URL: pass one (e.g. an EmbeddedRedis's .url) or set replay.redis_url")
        if replay_cfg.redis_tls and not url.startswith("rediss://"):
            raise ReplayError(f"replay.redis_tls is true but the URL is not rediss://: {cls._describe(url)}")
        if "password" not in kw and urlsplit(url).password is None:
            password = replay_cfg.resolve_password()
            if password is not None:
                kw["password"] = password
        return cls(
            url,
            name,
            key=key,
            capacity=replay_cfg.capacity,
            on_full=replay_cfg.on_full,
            sampling=replay_cfg.sampling,
            max_times_sampled=replay_cfg.max_times_sampled,
            samples_per_insert=replay_cfg.samples_per_insert,
            samples_per_insert_error=replay_cfg.samples_per_insert_error,
            min_size_to_sample=replay_cfg.min_size_to_sample,
            max_value_bytes=replay_cfg.max_value_bytes,
            **kw,
        )

    @staticmethod
    def _describe(url: str) -> str:
        """The URL without its credentials (for messages and logs)."""
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def close(self) -> None:
        self._r.close()

    def __repr__(self) -> str:
        return f"ReplayBuffer({self._where!r}, {self.name!r}, capacity={self.capacity})"

    # -- the one retry helper ---------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` (one Redis call, pipeline or script), retrying connection failures with backoff."""
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.02
        while True:
            try:
                return fn()
            except redis.AuthenticationError as exc:
                raise ReplayUnavailable(
                    f"Redis at {self._where} refused our credentials while {what} "
                    f"(replay.redis_url / replay.redis_password): {exc}"
                ) from None
            except redis.OutOfMemoryError as exc:
                raise ReplayMemoryError(_oom_message(exc)) from None
            except redis.ResponseError as exc:
                if str(exc).startswith("OOM"):
                    raise ReplayMemoryError(_oom_message(exc)) from None
                raise
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # includes BusyLoadingError
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReplayUnavailable(
                        f"Redis at {self._where} unreachable for {self.retry_timeout_s:.0f} s while {what}: {exc}"
                    ) from None
                log.warning("replay %s: Redis unreachable while %s (%s); retrying", self.name, what, exc)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    # -- insert -----------------------------------------------------------------------------------

    def insert(self, group: RolloutGroup, *, timeout: float | None = None) -> int:
        """Add `group`; returns its id. Full buffer: BufferFull (on_full=error) or wait (on_full=wait).

        `timeout` (seconds) bounds the wait with on_full=wait (default: wait_timeout_s; None = forever).
        """
        if not isinstance(group, RolloutGroup):
            raise ReplayError(f"a replay item is a RolloutGroup, got {type(group).__name__}")
        data = group.to_bytes(key=self.key)
        self.last_insert_bytes = len(data)
        m = self.max_value_bytes
        view = memoryview(data)
        parts = [view[i : i + m] for i in range(0, len(data), m)]
        meta = []
        for field in _META_FIELDS:
            meta += [field, str(getattr(group, field))]
        meta += ["inserted_at", repr(time.time())]
        timeout = self.wait_timeout_s if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout

        self._wait_for_room(deadline)
        item_id = int(self._call(lambda: self._reserve(args=[self.prefix, repr(time.time())]), "reserving an id"))
        published = False
        try:
            missing = 0
            while True:
                self._write_parts(item_id, parts)
                status = self._call(
                    lambda: self._publish(args=[self.prefix, item_id, self.capacity, len(parts), len(data), *meta]),
                    "publishing an item",
                )
                status = status.decode() if isinstance(status, bytes) else status
                if status in ("ok", "dup"):
                    published = True
                    return item_id
                if status == "missing":  # parts lost (e.g. garbage-collected while we were slow): rewrite
                    missing += 1
                    if missing >= 5:
                        raise ReplayError(f"item {item_id}: its parts kept disappearing before publish")
                    continue
                # full: another inserter took the last slot between our check and our publish
                self._drop_parts(item_id, len(parts))
                self._wait_for_room(deadline)
        finally:
            if not published:
                try:
                    self._drop_unpublished(args=[self.prefix, item_id, len(parts)])
                except redis.RedisError:
                    pass  # Redis is down: collect_garbage() removes these parts later

    def _write_parts(self, item_id: int, parts: list[memoryview]) -> None:
        def write():
            pipe = self._r.pipeline(transaction=False)
            # pending first (same connection, so in order): parts never exist without a record of them
            pipe.hset(self.prefix + "pending", item_id, f"{time.time()!r} {len(parts)}")
            for k, part in enumerate(parts):
                pipe.set(f"{self.prefix}item:{item_id}:part:{k}", part)
            pipe.execute()

        self._call(write, "writing item parts")

    def _drop_parts(self, item_id: int, nparts: int) -> None:
        self._call(
            lambda: self._r.delete(*(f"{self.prefix}item:{item_id}:part:{k}" for k in range(nparts))),
            "dropping unpublished parts",
        )

    def _wait_for_room(self, deadline: float | None) -> None:
        delay = 0.01
        while True:
            size = self.size()
            if size < self.capacity:
                return
            if self.on_full == "error" or (deadline is not None and time.monotonic() >= deadline):
                self._call(lambda: self._r.hincrby(self.prefix + "stats", "refused_full", 1), "counting a refusal")
                waited = "" if self.on_full == "error" else " after waiting (replay.on_full=wait, timeout reached)"
                raise BufferFull(
                    f"replay buffer {self.name!r} is full: size {size} >= replay.capacity "
                    f"{self.capacity}{waited}; nothing is evicted, items leave by sampling "
                    f"(replay.max_times_sampled) or clear()"
                )
            sleep = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(delay * 2, 0.5)

    # -- reading ----------------------------------------------------------------------------------

    def _fetch(self, item_id: int) -> bytes | None:
        """The record bytes of a published item; None if it is gone. Raises RecordError if damaged."""
        item = f"{self.prefix}item:{item_id}"
        meta = self._call(lambda: self._r.hmget(item, "parts", "length"), "reading item meta")
        if meta[0] is None:
            gone = self._call(lambda: self._r.zscore(self.prefix + "index", item_id), "reading the index") is None
            if gone:
                return None
            raise RecordError(f"item {item_id} has no meta")
        try:
            nparts, length = int(meta[0]), int(meta[1])
        except (TypeError, ValueError):
            raise RecordError(f"item {item_id} meta is malformed: {meta!r}") from None

        def read():
            pipe = self._r.pipeline(transaction=True)  # one snapshot: index membership and all parts
            pipe.zscore(self.prefix + "index", item_id)
            pipe.hget(item, "retired")
            for k in range(nparts):
                pipe.get(f"{item}:part:{k}")
            return pipe.execute()

        score, retired, *values = self._call(read, "reading item parts")
        if score is None and retired is None:
            return None  # not published (quarantined, or retired and expired)
        if score is None and any(v is None for v in values):
            return None  # retired by sample_ids and expiring
        if any(v is None for v in values):
            raise RecordError(f"item {item_id} misses part(s) {[k for k, v in enumerate(values) if v is None]}")
        data = b"".join(values)
        if len(data) != length:
            raise RecordError(f"item {item_id} has {len(data)} bytes, its meta says {length}")
        return data

    def _decode(self, item_id: int, data: bytes) -> RolloutGroup:
        return RolloutGroup.from_bytes(data, key=self.key)

    def _load(self, item_id: int) -> tuple[bytes, RolloutGroup] | None:
        """Bytes and decoded group of an item; None if gone or corrupt (corrupt ones are quarantined)."""
        try:
            data = self._fetch(item_id)
            if data is None:
                return None
            return data, self._decode(item_id, data)
        except RecordError as exc:
            self._quarantine(item_id, exc)
            return None

    def _quarantine(self, item_id: int, why: Exception) -> None:
        moved = self._call(lambda: self._quarantine_script(args=[self.prefix, item_id]), "quarantining an item")
        if moved:
            log.error("replay %s: item %d is corrupt and was quarantined (%s)", self.name, item_id, why)

    def get(self, item_id: int) -> RolloutGroup:
        """The item `item_id`, without counting a sample. ItemNotFound / CorruptItem otherwise.

        Also finds an item that `sample_ids` retired, until its linger time (`retired_linger_s`) is over.
        """
        try:
            data = self._fetch(item_id)
            if data is None:
                raise ItemNotFound(f"replay buffer {self.name!r} has no item {item_id}")
            return self._decode(item_id, data)
        except RecordError as exc:
            self._quarantine(item_id, exc)
            raise CorruptItem(f"replay item {item_id} is corrupt and was quarantined: {exc}") from None

    def size(self) -> int:
        return int(self._call(lambda: self._r.zcard(self.prefix + "index"), "reading the size"))

    def __len__(self) -> int:
        return self.size()

    def ids(self) -> list[int]:
        """Published item ids, oldest first."""
        return [int(x) for x in self._call(lambda: self._r.zrange(self.prefix + "index", 0, -1), "listing ids")]

    def times_sampled(self, item_id: int) -> int:
        value = self._call(lambda: self._r.hget(f"{self.prefix}item:{item_id}", "times_sampled"), "reading meta")
        if value is None:
            raise ItemNotFound(f"replay buffer {self.name!r} has no item {item_id}")
        return int(value)

    def stats(self) -> dict[str, int]:
        """The shared counters (see the module docstring) plus size, pending and quarantined."""

        def read():
            pipe = self._r.pipeline(transaction=True)
            pipe.hgetall(self.prefix + "stats")
            pipe.zcard(self.prefix + "index")
            pipe.hlen(self.prefix + "pending")
            pipe.zcard(self.prefix + "quarantine")
            return pipe.execute()

        counters, size, pending, quarantined = self._call(read, "reading stats")
        out = {name: 0 for name in _COUNTERS}
        out.update({k.decode(): int(v) for k, v in counters.items()})
        out.update(size=int(size), pending=int(pending), quarantined=int(quarantined))
        return out

    # -- sample -----------------------------------------------------------------------------------

    def sample(self, n: int, seed: int | None = None) -> list[RolloutGroup]:
        """`n` groups, each counted as sampled once per time it is returned.

        uniform: n draws with replacement, `random.Random(seed).randrange` over the ids in ascending order;
            an item drawn as often as its remaining replay.max_times_sampled budget leaves the pool for the
            rest of the call, a corrupt item leaves it and the draw is repeated.
        fifo: the n distinct items first in (times_sampled, id) order: the least sampled, oldest first
            (`seed` unused). With max_times_sampled=1 this is a plain queue.

        The result depends only on (seed, the buffer's items and their times_sampled), not on the client.
        seed=None draws a fresh random seed. Raises NotEnoughData (fewer than replay.min_size_to_sample
        items, or fewer than n usable items for fifo / for uniform once budgets run out) and RateLimited.
        Items reaching replay.max_times_sampled are retired (removed, counted in `retired`) by this call.
        """
        drawn, loaded = self._sample(n, seed, linger_ms=0)
        # Repeated draws are decoded again so that every returned group is an independent object.
        out, seen = [], set()
        for item_id in drawn:
            data, group = loaded[item_id]
            out.append(group if item_id not in seen else self._decode(item_id, data))
            seen.add(item_id)
        return out

    def sample_ids(self, n: int, seed: int | None = None) -> list[int]:
        """The ids `sample(n, seed)` would return groups of, with the same selection, counting and checks.

        For a learner whose rank 0 draws and broadcasts ids while every rank `get()`s its share. Items
        are decoded here too (a corrupt one is quarantined and never returned); an item this call
        retires leaves the index at once but stays readable by `get()` for `retired_linger_s` seconds.
        """
        return self._sample(n, seed, linger_ms=max(1, int(self.retired_linger_s * 1000)))[0]

    def _sample(self, n: int, seed: int | None, linger_ms: int) -> tuple[list[int], dict]:
        if n < 1:
            raise ReplayError(f"sample size must be >= 1, got {n}")
        if seed is None:
            seed = random.SystemRandom().getrandbits(64)
        for _ in range(50):  # a retry happens only when another client changed the items meanwhile
            result = self._sample_once(n, seed, linger_ms)
            if result is not None:
                return result
            time.sleep(random.uniform(0, 0.01))
        raise ReplayError(f"replay buffer {self.name!r}: sample kept conflicting with concurrent samplers")

    def _check_rate(self, n: int, samples: int, inserts: int, count: bool) -> None:
        if self.samples_per_insert is None:
            return
        allowed = self.samples_per_insert * inserts + self.samples_per_insert_error
        if samples + n > allowed:
            if count:
                self._call(lambda: self._r.hincrby(self.prefix + "stats", "rate_limited", 1), "counting a refusal")
            raise RateLimited(
                f"replay buffer {self.name!r}: sampling {n} more would make {samples + n} samples for "
                f"{inserts} inserts, over replay.samples_per_insert ({self.samples_per_insert}) x "
                f"{inserts} + replay.samples_per_insert_error ({self.samples_per_insert_error}) "
                f"= {allowed:g}; insert more first"
            )

    def _sample_once(self, n: int, seed: int, linger_ms: int) -> tuple[list[int], dict] | None:
        def snapshot():
            pipe = self._r.pipeline(transaction=True)
            pipe.zrange(self.prefix + "sampled", 0, -1, withscores=True)
            pipe.hmget(self.prefix + "stats", "samples", "inserts")
            return pipe.execute()

        entries, (samples, inserts) = self._call(snapshot, "reading the index")
        times = {int(member): int(score) for member, score in entries}  # fifo order is preserved by dict
        size = len(times)
        if size < self.min_size_to_sample:
            raise NotEnoughData(
                f"replay buffer {self.name!r} has {size} item(s), fewer than "
                f"replay.min_size_to_sample = {self.min_size_to_sample}"
            )
        self._check_rate(n, int(samples or 0), int(inserts or 0), count=True)

        loaded: dict[int, tuple[bytes, RolloutGroup] | None] = {}

        def load(item_id: int) -> tuple[bytes, RolloutGroup] | None:
            if item_id not in loaded:
                loaded[item_id] = self._load(item_id)
            return loaded[item_id]

        drawn: list[int] = []
        if self.sampling == "fifo":
            for item_id in times:  # (times_sampled, id) order
                if len(drawn) == n:
                    break
                got = load(item_id)
                if got is None:
                    if self._exists(item_id):
                        continue  # corrupt: quarantined, skipped
                    return None  # gone: another client retired it; start again
                drawn.append(item_id)
            if len(drawn) < n:
                raise NotEnoughData(
                    f"replay buffer {self.name!r}: fifo sample of {n} distinct items, only "
                    f"{len(drawn)} usable (size {size})"
                )
        else:
            rng = random.Random(seed)
            pool = sorted(times)
            cap = self.max_times_sampled
            budget = {i: cap - t for i, t in times.items()} if cap else {}
            while len(drawn) < n:
                if not pool:
                    raise NotEnoughData(
                        f"replay buffer {self.name!r}: {len(drawn)} of {n} draws made, then no item "
                        f"left with sample budget (replay.max_times_sampled = {cap}) or decodable"
                    )
                at = rng.randrange(len(pool))
                item_id = pool[at]
                got = load(item_id)
                if got is None:
                    if self._exists(item_id):
                        pool.pop(at)  # corrupt: quarantined, draw again
                        continue
                    return None
                drawn.append(item_id)
                if cap:
                    budget[item_id] -= 1
                    if budget[item_id] <= 0:
                        pool.pop(at)

        counts: dict[int, int] = {}
        for item_id in drawn:
            counts[item_id] = counts.get(item_id, 0) + 1
        args = [
            self.prefix,
            uuid.uuid4().hex,
            self.max_times_sampled,
            "" if self.samples_per_insert is None else repr(float(self.samples_per_insert)),
            repr(float(self.samples_per_insert_error)),
            len(drawn),
            linger_ms,
        ]
        for item_id, count in counts.items():
            args += [item_id, count]
        reply = self._call(lambda: self._claim(args=args), "claiming a sample")
        status = reply[0].decode()
        if status == "rate":
            self._check_rate(n, int(reply[1]), int(reply[2]), count=False)  # raises with the numbers
            raise RateLimited(
                f"replay buffer {self.name!r}: sampling {n} refused by the rate limiter (replay.samples_per_insert)"
            )
        if status in ("gone", "conflict"):
            return None
        return drawn, loaded  # ok (or dup: our own claim, applied once, whose reply was lost)

    def _exists(self, item_id: int) -> bool:
        """Still published, or quarantined by us just now (as opposed to retired by someone else)."""

        def read():
            pipe = self._r.pipeline(transaction=True)
            pipe.zscore(self.prefix + "index", item_id)
            pipe.zscore(self.prefix + "quarantine", item_id)
            return pipe.execute()

        in_index, in_quarantine = self._call(read, "reading the index")
        return in_index is not None or in_quarantine is not None

    # -- maintenance ------------------------------------------------------------------------------

    def collect_garbage(self, older_than_s: float = 600.0) -> int:
        """Remove parts of items that were never published (a writer died between parts and publish).

        Pending ids reserved more than `older_than_s` ago are dropped, and part keys whose id is neither
        published, quarantined nor pending are deleted (SCAN over this buffer's keys: an operator's job,
        not a hot path). Returns the number of keys deleted. A writer slower than `older_than_s` is not
        harmed: its publish notices the missing parts and writes them again.
        """
        deleted = 0
        now = time.time()
        pending = self._call(lambda: self._r.hgetall(self.prefix + "pending"), "reading pending ids")
        for item_id, value in pending.items():
            try:
                when, nparts = value.decode().split()
                when, nparts = float(when), int(nparts)
            except ValueError:
                when, nparts = 0.0, 0
            if now - when >= older_than_s:
                deleted += int(
                    self._call(
                        lambda: self._drop_unpublished(args=[self.prefix, item_id, nparts]),  # noqa: B023 (called at once)
                        "dropping unpublished parts",
                    )
                )
        cursor = 0
        pattern = f"{self.prefix}item:*:part:*".encode()
        while True:
            cursor, keys = self._call(lambda: self._r.scan(cursor, match=pattern, count=1000), "scanning keys")  # noqa: B023 (called at once)
            for key in keys:
                item_id = key[len(self.prefix) + 5 :].split(b":", 1)[0]
                deleted += int(
                    self._call(
                        lambda key=key, item_id=item_id: self._drop_orphan(keys=[key], args=[self.prefix, item_id]),
                        "dropping an orphan part",
                    )
                )
            if cursor == 0:
                return deleted

    def quarantined(self) -> list[int]:
        return [int(x) for x in self._call(lambda: self._r.zrange(self.prefix + "quarantine", 0, -1), "listing")]

    def purge_quarantine(self) -> int:
        """Delete the quarantined items' meta and parts; returns how many items."""
        ids = self.quarantined()
        for item_id in ids:
            item = f"{self.prefix}item:{item_id}"
            nparts = self._call(lambda: self._r.hget(item, "parts"), "reading meta")  # noqa: B023 (called at once)
            try:
                nparts = int(nparts or 0)
            except ValueError:
                nparts = 0
            keys = [item, *(f"{item}:part:{k}" for k in range(nparts))]

            def purge():
                pipe = self._r.pipeline(transaction=True)
                pipe.delete(*keys)  # noqa: B023 (called at once)
                pipe.zrem(self.prefix + "quarantine", item_id)  # noqa: B023 (called at once)
                pipe.execute()

            self._call(purge, "purging quarantine")
        return len(ids)

    def clear(self) -> int:
        """Remove every published item (counted in `cleared`); counters and ids carry on. Returns the count."""
        total = 0
        while True:
            n = int(self._call(lambda: self._clear(args=[self.prefix, 100]), "clearing"))
            total += n
            if n == 0:
                return total
