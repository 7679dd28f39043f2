"""The token usage of an answer, read from the end of its body once the request is over.

Both APIs put `usage` at the end: a chat completion's JSON, a chat stream's last chunk before `[DONE]`
(with `stream_options.include_usage`), a Responses object and its stream's `response.completed` event.
So the relay keeps a reference to a body's last two chunks while relaying (relay.relaying) and looks
only there: the last `"usage"` in its last TAIL bytes, the object after it matched by one regex and
parsed by orjson. No chunk is parsed or delayed on its way to the client. An answer without usage, or
with one that does not parse (cut, compressed, null), counts nothing.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

TAIL = 16 * 1024  # after `usage` come at most `user` and `metadata` (16 pairs of 512 characters at most)
# The usage object: numbers, and objects of numbers one level down (`*_tokens_details`).
_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


class Tokens(NamedTuple):
    prompt: int
    completion: int
    cached: int  # prompt tokens the upstream's cache served
    reasoning: int  # completion tokens spent thinking


def tokens_in(before: bytes, last: bytes) -> Tokens | None:
    """The usage at the end of a body whose last two chunks are `before` and `last`."""
    window = last if len(last) >= TAIL else before[-(TAIL - len(last)) :] + last
    start = window.rfind(b'"usage"', max(0, len(window) - TAIL))
    if start < 0:
        return None
    found = _USAGE.match(window, start)
    if found is None:  # "usage": null, or cut off
        return None
    try:
        usage = orjson.loads(found.group(1))
    except orjson.JSONDecodeError:
        return None
    return _tokens(usage)


def _tokens(usage: dict[str, Any]) -> Tokens | None:
    """Chat's prompt/completion names, or the Responses API's input/output ones."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    reasoning = completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None
    return Tokens(prompt, completion, cached if isinstance(cached, int) else 0, reasoning if isinstance(reasoning, int) else 0)
