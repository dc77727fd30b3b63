"""The shared session store on Redis: per session a hash (epoch, version, state) and a list
(its last replies), per session id of a model the version whose record it is, and two Lua
scripts.

claim: per session, read the state and replies and, if it is stored, take it over under a new
epoch (chosen by the replica, at random), in one call. A session the store does not hold is
left alone: nothing is written for a request on an unknown session.
write: per session, apply the write only if the stored epoch and version are the ones named
(version 0: only if no other replica has stored the session meanwhile), in one call, so a batch
costs one round trip and a fenced writer changes nothing. A delete removes both keys: epochs
are random, so an old claim never matches a later session of the same id.
A claim of a session the store holds only under another version of the model takes nothing
and says which version holds it. The keys of a session share a hash tag, and expire after the
session TTL (refreshed by every claim and write).
"""

from __future__ import annotations

import logging
import secrets
import ssl
import struct
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from lstm_serve.core.remote import Claim, Reply, State, StoreDown, Write

logger = logging.getLogger(__name__)

F32 = np.dtype("<f4")
REPLY_HEAD = struct.Struct("<qqQ?")  # seq, next_seq, digest, reset; then y as float32

# KEYS per session: its hash, its reply list, and the model's record of which version holds
# the session id. ARGV: ttl_ms, this model version, then one new epoch per session. Out per
# session: {} (not stored), {version} (the id lives on that other version: not claimed, and
# this version's record of it, superseded, is deleted), or version, h, c, y, next_seq,
# replies.
CLAIM = """
local out = {}
local j = 3
for i = 1, #KEYS, 3 do
  local k, rk, wk = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local v = redis.call('HMGET', k, 'v', 'h', 'c', 'y', 'n')
  local w = redis.call('GET', wk)
  if w and w ~= ARGV[2] then
    if v[2] then redis.call('DEL', k, rk) end
    out[#out + 1] = {w}
  elseif v[2] then
    redis.call('HSET', k, 'e', ARGV[j])
    redis.call('PEXPIRE', k, ARGV[1])
    redis.call('PEXPIRE', rk, ARGV[1])
    redis.call('PEXPIRE', wk, ARGV[1])
    out[#out + 1] = {v[1], v[2], v[3], v[4], v[5], redis.call('LRANGE', rk, 0, -1)}
  else
    out[#out + 1] = {}
  end
  j = j + 1
end
return out
"""

# KEYS as CLAIM's. ARGV: ttl_ms, replies kept, this model version, then per session: op,
# epoch, version, h, c, y, next_seq, clear, the number of replies, the replies. A write that
# follows a version (not a creation) is fenced once the id lives on another model version.
WRITE = """
local ttl, keep, own, a = ARGV[1], tonumber(ARGV[2]), ARGV[3], 4
local out = {}
for i = 1, #KEYS, 3 do
  local k, rk, wk = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local nr = tonumber(ARGV[a + 8])
  local first = a + 9
  local v = ARGV[a + 2]
  local ok
  if v == '0' then
    ok = redis.call('HEXISTS', k, 'h') == 0
  else
    local cur = redis.call('HMGET', k, 'e', 'v')
    local w = redis.call('GET', wk)
    ok = cur[1] == ARGV[a + 1] and cur[2] == v and (not w or w == own)
  end
  if not ok then
    out[#out + 1] = 0
  elseif ARGV[a] == 'd' then
    redis.call('DEL', k, rk)
    if redis.call('GET', wk) == own then redis.call('DEL', wk) end
    out[#out + 1] = 1
  else
    redis.call('HSET', k, 'e', ARGV[a + 1], 'v', tostring(tonumber(v) + 1), 'h', ARGV[a + 3],
      'c', ARGV[a + 4], 'y', ARGV[a + 5], 'n', ARGV[a + 6])
    if ARGV[a + 7] == '1' then redis.call('DEL', rk) end
    for j = first, first + nr - 1 do redis.call('RPUSH', rk, ARGV[j]) end
    redis.call('LTRIM', rk, -keep, -1)
    redis.call('PEXPIRE', k, ttl)
    redis.call('PEXPIRE', rk, ttl)
    redis.call('SET', wk, own, 'PX', ttl)
    out[#out + 1] = 1
  end
  a = first + nr
end
return out
"""

# Errors that mean the store refuses this replica, not that it is down: wrong or missing
# credentials, an ACL that forbids what the replica runs (or scripts switched off).
_REFUSALS = (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
)


def refused(exc: BaseException) -> bool:
    """Whether exc says the store refuses this replica (its credentials, its TLS settings, its
    permissions) rather than that the store is down or unreachable."""
    if isinstance(exc, _REFUSALS):
        return True
    if isinstance(exc, ResponseError) and str(exc).lower().startswith("unknown command"):
        return True  # a managed Redis without Lua scripts
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # redis-py wraps TLS failures in its own errors
        if isinstance(e, ssl.SSLError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def redact(url: str) -> str:
    """The store URL with its password (in the user part or the query) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable store URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        # user:password, or a lone word that redis-py takes as a user name but may be a secret
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="/*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client (a connection pool) for a redis:// URL; every call fails after timeout_s."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=5
    )


async def check(client: aioredis.Redis) -> None:
    """One call that needs what a replica needs of the store: a connection, its credentials
    and TLS settings accepted, and Lua scripts allowed. Raises StoreDown."""
    try:
        await client.register_script("return 1")()
    except (RedisError, OSError) as exc:
        raise _down(exc) from exc


class RedisRemote:
    """One model's sessions under the key prefix namespace (shared by all replicas)."""

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        layers: int,
        hidden: int,
        output_dim: int,
        ttl_s: float,
        replies: int,
        model: str = "",
        version: str = "",
    ) -> None:
        """model, version: the model version whose sessions these are (namespace says it with
        its weights' hash); "": namespace stands for both (a store of one version alone)."""
        self.client = client
        self.prefix = f"lstm-serve:{namespace}:"
        # Which version holds a session id: one key per id for all versions of the model.
        self.where_prefix = f"lstm-serve:{model or namespace}:where:"
        self.own = version or namespace
        self.shape = (layers, hidden)
        self.output_dim = output_dim
        self.ttl_ms = str(max(int(ttl_s * 1000), 1))
        self.replies = str(max(replies, 1))
        self._claim = client.register_script(CLAIM)
        self._write = client.register_script(WRITE)

    def key(self, session: str) -> str:
        # {..}: a hash tag, so both keys of a session land on one Redis Cluster slot.
        return f"{self.prefix}{{{session}}}"

    def _keys(self, sessions: list[str]) -> list[str]:
        out = []
        for s in sessions:
            k = self.key(s)
            out += [k, k + ":r", f"{self.where_prefix}{{{s}}}"]
        return out

    async def claim(self, keys: list[str]) -> list[Claim]:
        # Random epochs (62 bits): never reused, so deleting an ended session needs no marker.
        epochs = [secrets.randbits(62) + 1 for _ in keys]
        rows = await self._call(self._claim, self._keys(keys), [self.ttl_ms, self.own, *epochs])
        return [self._decode(e, row) for e, row in zip(epochs, rows, strict=True)]

    async def write(self, writes: list[Write]) -> list[bool]:
        args: list[Any] = [self.ttl_ms, self.replies, self.own]
        for w in writes:
            args += [b"d" if w.state is None else b"w", str(w.epoch), str(w.version)]
            args += self._encode(w.state)
        done = await self._call(self._write, self._keys([w.key for w in writes]), args)
        return [bool(d) for d in done]

    async def peek(self, key: str) -> int | None:
        try:
            n = await self.client.hget(self.key(key), "n")
        except (RedisError, OSError) as exc:
            raise _down(exc) from exc
        return None if n is None else int(n)

    async def check(self) -> None:
        await check(self.client)

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            out: list[Any] = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _down(exc) from exc
        return out

    @staticmethod
    def _encode(s: State | None) -> list[bytes]:
        if s is None:
            return [b"", b"", b"", b"0", b"0", b"0"]
        out = [
            np.ascontiguousarray(s.h, F32).tobytes(),
            np.ascontiguousarray(s.c, F32).tobytes(),
            np.ascontiguousarray(s.last_y, F32).tobytes(),
            str(s.next_seq).encode(),
            b"1" if s.clear else b"0",
            str(len(s.replies)).encode(),
        ]
        for r in s.replies:
            head = REPLY_HEAD.pack(r.seq, r.next_seq, r.digest, r.reset)
            out.append(head + np.ascontiguousarray(r.y, F32).tobytes())
        return out

    def _decode(self, epoch: int, row: list[Any]) -> Claim:
        if not row:
            return Claim(epoch, 0, None)
        if len(row) == 1:  # held under another version of the model
            other = row[0]
            return Claim(epoch, 0, None, other.decode() if isinstance(other, bytes) else other)
        version, h, c, y, n, replies = row
        rs = []
        for blob in replies:
            seq, nxt, dig, reset = REPLY_HEAD.unpack_from(blob)
            ry = np.frombuffer(blob, F32, offset=REPLY_HEAD.size).reshape(-1, self.output_dim)
            rs.append(Reply(seq, nxt, dig, reset, ry.copy()))
        state = State(
            np.frombuffer(h, F32).reshape(self.shape).copy(),
            np.frombuffer(c, F32).reshape(self.shape).copy(),
            np.frombuffer(y, F32).copy(),
            int(n),
            tuple(rs),
        )
        return Claim(epoch, int(version), state)


def _down(exc: BaseException) -> StoreDown:
    return StoreDown(f"{type(exc).__name__}: {exc}", refused(exc))
