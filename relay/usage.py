"""The token usage of an answer, read from the end of its body once the request is over.

Both APIs put `usage` at the end: a chat completion's JSON, a chat stream's last chunk before `[DONE]`
(with `stream_options.include_usage`), a Responses object and its stream's `response.completed` event.
So the relay keeps a reference to a body's last two chunks while relaying (relay.relaying) and looks
only there: the last `"usage":` in their last TAIL bytes, the object after it (its end found by counting
braces with bytes.find and bytes.count, which run in C), parsed by orjson. No chunk is parsed or delayed
on its way to the client. An answer without usage, or with one that does not parse (cut, compressed,
null), counts nothing.

Measured (callgrind, 1 KB chat completions): regexes walked the usage a character at a time and cost
twice to three times what this does; orjson's parse of the few hundred bytes is most of what is left.
"""

from __future__ import annotations

import orjson

TAIL = 16 * 1024  # after `usage` come at most `user` and `metadata` (16 pairs of 512 characters at most)
_NESTING = 4  # usage holds numbers and objects of numbers (`*_tokens_details`): braces close within a few


# (prompt, completion, cached prompt, reasoning completion): a plain tuple, which costs a fifth of what a
# NamedTuple's construction does, once per request.
Tokens = tuple[int, int, int, int]
PROMPT, COMPLETION, CACHED, REASONING = range(4)


def tokens_in(before: bytes, last: bytes) -> Tokens | None:
    """The usage at the end of a body whose last two chunks are `before` and `last`."""
    start = last.rfind(b'"usage":', len(last) - TAIL if len(last) > TAIL else 0)
    window = last
    if start < 0:
        if not before:
            return None
        window = before[-(TAIL - len(last)) :] + last if len(last) < TAIL else last
        start = window.rfind(b'"usage":')
        if start < 0:
            return None
    # Most often `usage` is a key of the body's (or the SSE event's) top-level object, as in a chat
    # completion, a Responses object, a chat stream's usage chunk: what follows it closes that object, so
    # `{` and the rest parse as one object, with no brace to count. Else (a Responses stream nests it in
    # response.completed; pretty-printed JSON spans lines) the braces are counted.
    end = len(window) if window[-1:] == b"}" else window.find(b"\n", start)  # JSON, or an SSE data line
    try:
        usage = orjson.loads(b"{" + window[start:end]).get("usage")
    except orjson.JSONDecodeError:
        usage = _nested(window, start)
    if type(usage) is not dict:
        return None
    get = usage.get
    prompt = get("prompt_tokens")
    if prompt is None:
        prompt = get("input_tokens")
    completion = get("completion_tokens")
    if completion is None:
        completion = get("output_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    details = get("prompt_tokens_details") or get("input_tokens_details")
    cached = details.get("cached_tokens", 0) if type(details) is dict else 0
    details = get("completion_tokens_details") or get("output_tokens_details")
    reasoning = details.get("reasoning_tokens", 0) if type(details) is dict else 0
    return prompt, completion, cached if type(cached) is int else 0, reasoning if type(reasoning) is int else 0


def _nested(window: bytes, start: int) -> object:
    """The usage object anywhere: its end found by counting braces."""
    opening = window.find(b"{", start + 8, start + 16)
    if opening < 0 or window[start + 8 : opening].strip():  # "usage": null, or no object
        return None
    closing = _closing(window, opening)
    if closing < 0:  # cut off
        return None
    try:
        return orjson.loads(window[opening : closing + 1])
    except orjson.JSONDecodeError:
        return None


def _closing(data: bytes, opening: int) -> int:
    """Where the object that opens at data[opening] closes; -1 if not within a few nested braces."""
    closing = data.find(b"}", opening)
    depth = data.count(b"{", opening, closing) - 1
    for _ in range(_NESTING):
        if closing < 0 or depth == 0:
            return closing
        position = closing + 1
        closing = data.find(b"}", position)
        depth += data.count(b"{", position, closing) - 1
    return -1
