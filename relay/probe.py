"""The optional active health check: `GET {base}{routing.probe_path}` on every upstream each
`routing.probe_interval` seconds, through aiohttp's public client (a session of its own, off the hot
path). An answer below 500 means the upstream is up (an ejected one comes back at once); no answer, or a
5xx, counts as a failure like a failed request does (relay.health)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp

from relay.fleet import Member

log = logging.getLogger("relay")


async def probe(session: aiohttp.ClientSession, member: Member, path: str) -> bool:
    """One probe of one upstream; its health learns the outcome, which is also returned."""
    url = member.upstream.base_url + path
    try:
        async with session.get(url, headers={"Authorization": f"Bearer {member.upstream.api_key}"}) as response:
            alive = response.status < 500
    except (aiohttp.ClientError, TimeoutError):
        alive = False
    if alive:
        member.health.succeeded()
    elif member.health.failed():
        log.warning("relay: upstream %s ejected after %d failed probes", member.label, member.health.failures)
    member.probed = alive
    return alive


async def keep_probing(members: Sequence[Member], path: str, interval: float, timeout: float) -> None:
    """The app runs this as a task for as long as it serves (only with routing.probe_interval)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        while True:
            await asyncio.gather(*(probe(session, member, path) for member in members))
            await asyncio.sleep(interval)
