"""The shared session store on Redis: per session a hash (epoch, version, state) and a list
(its last replies), and two Lua scripts.

claim: per session, take a new epoch (HINCRBY) and read the state and replies, in one call.
write: per session, apply the write only if the stored epoch and version are the ones named,
in one call, so a batch costs one round trip and a fenced writer changes nothing.
Both keys of a session share a hash tag, and expire after the session TTL (refreshed by every
claim and write).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lstm_serve.core.remote import Claim, Reply, State, StoreDown, Write

logger = logging.getLogger(__name__)

F32 = np.dtype("<f4")
REPLY_HEAD = struct.Struct("<qqQ?")  # seq, next_seq, digest, reset; then y as float32

CLAIM = """
local out = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local e = redis.call('HINCRBY', k, 'e', 1)
  redis.call('PEXPIRE', k, ARGV[1])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
  local v = redis.call('HMGET', k, 'v', 'h', 'c', 'y', 'n')
  out[#out + 1] = {e, v[1], v[2], v[3], v[4], v[5], redis.call('LRANGE', KEYS[i + 1], 0, -1)}
end
return out
"""

# ARGV: ttl_ms, replies kept, then per session: op, epoch, version, h, c, y, next_seq, clear,
# the number of replies, the replies.
WRITE = """
local ttl, keep, a = ARGV[1], tonumber(ARGV[2]), 3
local out = {}
for i = 1, #KEYS, 2 do
  local k, rk = KEYS[i], KEYS[i + 1]
  local nr = tonumber(ARGV[a + 8])
  local first = a + 9
  local cur = redis.call('HMGET', k, 'e', 'v')
  local v = ARGV[a + 2]
  if cur[1] ~= ARGV[a + 1] or (cur[2] or '0') ~= v then
    out[#out + 1] = 0
  elseif ARGV[a] == 'd' then
    -- the epoch and version stay (until the TTL), so they never go back
    redis.call('HDEL', k, 'h', 'c', 'y', 'n')
    redis.call('HSET', k, 'v', tostring(tonumber(v) + 1))
    redis.call('DEL', rk)
    redis.call('PEXPIRE', k, ttl)
    out[#out + 1] = 1
  else
    redis.call('HSET', k, 'v', tostring(tonumber(v) + 1), 'h', ARGV[a + 3], 'c', ARGV[a + 4],
      'y', ARGV[a + 5], 'n', ARGV[a + 6])
    if ARGV[a + 7] == '1' then redis.call('DEL', rk) end
    for j = first, first + nr - 1 do redis.call('RPUSH', rk, ARGV[j]) end
    redis.call('LTRIM', rk, -keep, -1)
    redis.call('PEXPIRE', k, ttl)
    redis.call('PEXPIRE', rk, ttl)
    out[#out + 1] = 1
  end
  a = first + nr
end
return out
"""


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client (a connection pool) for a redis:// URL; every call fails after timeout_s."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=5
    )


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
    ) -> None:
        self.client = client
        self.prefix = f"lstm-serve:{namespace}:"
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
            out += [k, k + ":r"]
        return out

    async def claim(self, keys: list[str]) -> list[Claim]:
        rows = await self._call(self._claim, self._keys(keys), [self.ttl_ms])
        return [self._decode(row) for row in rows]

    async def write(self, writes: list[Write]) -> list[bool]:
        args: list[Any] = [self.ttl_ms, self.replies]
        for w in writes:
            args += [b"d" if w.state is None else b"w", str(w.epoch), str(w.version)]
            args += self._encode(w.state)
        done = await self._call(self._write, self._keys([w.key for w in writes]), args)
        return [bool(d) for d in done]

    async def peek(self, key: str) -> int | None:
        try:
            n = await self.client.hget(self.key(key), "n")
        except (RedisError, OSError) as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
        return None if n is None else int(n)

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            out: list[Any] = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
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

    def _decode(self, row: list[Any]) -> Claim:
        epoch, version, h, c, y, n, replies = row
        ver = int(version) if version else 0
        if not h:
            return Claim(int(epoch), ver, None)
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
        return Claim(int(epoch), ver, state)
