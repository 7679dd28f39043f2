"""The cluster's state in Redis, and the only module that imports redis (relay.cluster loads it only when
a config names a cluster). Every operation is one Lua script, so each is atomic and one round trip, and
every call is bounded by `redis_timeout`: a Redis that is slow counts as one that is unreachable.

Keys of a job, all under one hash tag so a Redis Cluster keeps them in one slot (a script may only touch
keys of one slot): `relay:{name}:leases` (sorted set: slot id -> expiry), `:queue` (process id -> the
arrival of its oldest waiter), `:tickets` (process id -> expiry of its place in the queue), `:members`
(process id -> expiry), `:requests` and `:tokens` (the GCRA budgets' tat, relay.cluster.budget) and
`:pause` (set, with an expiry, when the upstream said its own budget is spent). Times are Redis's clock
(TIME), in milliseconds, so hosts whose clocks disagree still agree on every expiry and every order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.cluster.budget import Admitted
from relay.settings import Cluster

ERRORS = (RedisError, OSError, TimeoutError)  # what a call to an unreachable, broken or slow Redis raises
_CONNECTIONS = 8  # admit, release, renewal, pause and the wake subscription each use one at a time

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
_PRUNE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, who in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], who) redis.call('ZREM', KEYS[3], who)
end
"""
_TAT = """
local function store_tat(key, tat, tol)
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.max(1, math.floor(tat - now + tol)) + 1000)
end
"""

# KEYS leases queue tickets requests tokens pause; ARGV pid cap lease_ms req_interval tok_interval
# tolerance local_pause_ms waiting wake_prefix n, then n times: slot_id cost allowance_ms arrival_ms.
# A process may take a slot when fewer processes wait ahead of it than slots are free (ahead: its rank in
# the queue, or the whole queue if it has no place yet), so no process jumps the queue; slots it leaves
# free go to the processes next in line, which are told to look again.
_ADMIT = _NOW + _PRUNE + _TAT + """
local pid, cap, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rint, tint, tol = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local waiting, n = tonumber(ARGV[8]), tonumber(ARGV[10])
local slots, used = n, 0
if cap > 0 then
  used = redis.call('ZCARD', KEYS[1])
  local ahead = redis.call('ZRANK', KEYS[2], pid) or redis.call('ZCARD', KEYS[2])
  slots = math.max(0, math.min(n, cap - used - ahead))
end
local pause = math.max(redis.call('PTTL', KEYS[6]), tonumber(ARGV[7]), 0)
local rtat = tonumber(redis.call('GET', KEYS[4]) or '0')
local ttat = tonumber(redis.call('GET', KEYS[5]) or '0')
local taken, reason, refused_wait, waits = 0, 0, 0, {}
for i = 1, slots do
  local at = 10 + 4 * (i - 1)
  local cost, allowance = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local start, why = now + pause, 3
  if rint > 0 and rtat - tol > start then start, why = rtat - tol, 1 end
  if tint > 0 and ttat - tol > start then start, why = ttat - tol, 2 end
  if start - now > allowance then reason, refused_wait = why, math.ceil(start - now) break end
  if rint > 0 then rtat = math.max(rtat, start) + rint end
  if tint > 0 then ttat = math.max(ttat, start) + cost * tint end
  if cap > 0 then redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[at + 1]) end
  taken = i
  waits[i] = math.floor(start - now)
end
if taken > 0 and rint > 0 then store_tat(KEYS[4], rtat, tol) end
if taken > 0 and tint > 0 then store_tat(KEYS[5], ttat, tol) end
local queued = 0
if cap > 0 then
  local next_one = taken + (reason > 0 and 2 or 1)
  if waiting >= next_one then
    local arrival = now  -- the next waiter's arrival; 0 when the process does not know Redis's clock yet
    if next_one <= n then
      local at = tonumber(ARGV[10 + 4 * (next_one - 1) + 4])
      if at > 0 and at < now then arrival = at end
    end
    redis.call('ZADD', KEYS[2], arrival, pid)
    redis.call('ZADD', KEYS[3], now + lease_ms, pid)
    queued = 1
  else
    redis.call('ZREM', KEYS[2], pid) redis.call('ZREM', KEYS[3], pid)
  end
  for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], 3 * lease_ms) end
  local free = cap - used - taken
  if free > 0 and queued == 0 then
    for _, who in ipairs(redis.call('ZRANGE', KEYS[2], 0, math.min(free, 16) - 1)) do
      redis.call('PUBLISH', ARGV[9] .. who, '1')
    end
  end
end
local function remaining(tat, int)
  if int <= 0 then return -1 end
  local room = now + tol - math.max(tat, now)
  if room < 0 then return 0 end
  return math.floor(room / int) + 1
end
local reply = {taken, reason, refused_wait, now, used + taken, queued, remaining(rtat, rint), remaining(ttat, tint)}
for i = 1, taken do reply[8 + i] = waits[i] end
return reply
"""

# KEYS leases queue tickets requests tokens; ARGV cap req_interval tok_interval tolerance unsent
# token_delta wake_prefix, then slot ids. The processes first in the queue, as many as slots are now
# free, are told to look again: the ones that may now take a slot, and no others.
_RELEASE = _NOW + _PRUNE + _TAT + """
local cap, rint, tint, tol = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function correct(key, int, delta)
  if int <= 0 or delta == 0 then return end
  local tat = tonumber(redis.call('GET', key) or '0')
  store_tat(key, math.max(math.max(tat, now) + delta * int, now), tol)
end
correct(KEYS[4], rint, -tonumber(ARGV[5]))
correct(KEYS[5], tint, tonumber(ARGV[6]))
if #ARGV > 7 then redis.call('ZREM', KEYS[1], unpack(ARGV, 8)) end
local used = redis.call('ZCARD', KEYS[1])
if cap > 0 and #ARGV > 7 and used < cap then
  for _, who in ipairs(redis.call('ZRANGE', KEYS[2], 0, math.min(cap - used, 16) - 1)) do
    redis.call('PUBLISH', ARGV[7] .. who, '1')
  end
end
return used
"""

# KEYS leases members; ARGV pid lease_ms n, then n slot ids to keep, then slot ids to drop. Slots are
# added back if they are missing, so a Redis that restarted empty learns again what is in flight.
_RENEW = _NOW + """
local expiry, n = now + tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, 3 + n do redis.call('ZADD', KEYS[1], expiry, ARGV[i]) end
if #ARGV > 3 + n then redis.call('ZREM', KEYS[1], unpack(ARGV, 4 + n)) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
for k = 1, 2 do redis.call('PEXPIRE', KEYS[k], 3 * tonumber(ARGV[2])) end
return {redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[1]), now}
"""

# KEYS pause; ARGV ms: a longer pause than the one set wins.
_PAUSE = "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end return 1"


class Store:
    errors = ERRORS

    def __init__(self, settings: Cluster) -> None:
        self.timeout = settings.redis_timeout or 0.5
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=_CONNECTIONS,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One retry, at once and on a new connection, for a connection found dead (closed by a Redis that
            # restarted, or idle-closed): Redis cannot have run the command. Nothing else is retried
            # here (a timeout is not): the caller decides what a failure means.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )
        self.client = redis.asyncio.Redis.from_pool(pool)  # closing the client closes its pool
        prefix = f"relay:{{{settings.name}}}:"
        self.slot_keys = [prefix + key for key in ("leases", "queue", "tickets", "requests", "tokens")]
        self.pause_key = prefix + "pause"
        self.members_key = prefix + "members"
        self.wake_prefix = prefix + "wake:"
        self.cap = settings.max_concurrent_requests or 0
        self.lease_ms = int(settings.lease_seconds * 1000)
        rpm, tpm = settings.requests_per_minute, settings.tokens_per_minute
        self.intervals = (60_000 / rpm if rpm else 0, 60_000 / tpm if tpm else 0)
        self.tolerance = settings.burst_seconds * 1000
        self._admit = self.client.register_script(_ADMIT)
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)
        self._pause = self.client.register_script(_PAUSE)

    async def admit(self, pid: str, local_pause_ms: int, waiting: int, batch: Sequence[tuple[str, int, int, int]]) -> Admitted:
        """`batch`: (slot id, token cost, allowance ms, arrival ms on Redis's clock) of the first waiters."""
        args: list[object] = [pid, self.cap, self.lease_ms, *self.intervals, self.tolerance, local_pause_ms, waiting]
        args += [self.wake_prefix, len(batch)]
        for entry in batch:
            args.extend(entry)
        async with asyncio.timeout(self.timeout):
            reply = await self._admit(keys=[*self.slot_keys, self.pause_key], args=args)
        return Admitted(*(int(x) for x in reply[:5]), bool(reply[5]), int(reply[6]), int(reply[7]), [int(x) for x in reply[8:]])

    async def release(self, slot_ids: Sequence[str], unsent: int, token_delta: int) -> int:
        """Give back slots, refund the requests that never went, correct the token charge; -> slots in use."""
        args = [self.cap, *self.intervals, self.tolerance, unsent, token_delta, self.wake_prefix, *slot_ids]
        async with asyncio.timeout(self.timeout):
            return int(await self._release(keys=self.slot_keys, args=args))

    async def renew(self, pid: str, keep: Sequence[str], drop: Sequence[str]) -> tuple[int, int, int]:
        """Extend this process's slots and membership -> (live processes, slots in use, Redis's clock)."""
        async with asyncio.timeout(self.timeout):
            reply = await self._renew(keys=[self.slot_keys[0], self.members_key], args=[pid, self.lease_ms, len(keep), *keep, *drop])
        return int(reply[0]), int(reply[1]), int(reply[2])

    async def pause(self, ms: int) -> None:
        async with asyncio.timeout(self.timeout):
            await self._pause(keys=[self.pause_key], args=[ms])

    async def leave(self, pid: str) -> None:
        async with asyncio.timeout(self.timeout):
            await self.client.zrem(self.members_key, pid)

    async def listen(self, pid: str, woken: Callable[[], None], retry_after: float) -> None:
        """Call `woken()` whenever a release says this process may take a slot; runs until cancelled. A
        lost subscription is made again (and `woken()` called, for what it may have missed)."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(self.wake_prefix + pid)
                woken()
                while True:
                    if await pubsub.get_message(timeout=retry_after) is not None:
                        woken()
            except ERRORS:
                pass  # Redis's state is the renewal's to judge and log; this only waits to subscribe again
            finally:
                await pubsub.aclose()
            await asyncio.sleep(retry_after)

    async def close(self) -> None:
        await self.client.aclose()
