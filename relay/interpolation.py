"""Placeholders in config values, resolved as NeMo Gym's OmegaConf resolves them, plus the relay's own
fallback to the environment:

- `${name}` and `${a.b}`: from each source in order (env.yaml first, so credentials stay out of the
  committed config; then the config's own top-level keys, as Gym resolves `${policy_base_url}`), then
  from the environment (`name`, then `NAME`). What a variable holds is resolved in turn;
- `${oc.env:VAR}` and `${oc.env:VAR,default}`: the environment variable (set counts, even empty), else
  the default: empty, quoted ('a,b'), or a literal that OmegaConf writes as text (`false` -> "False"),
  `null` -> null; without a default, an unset variable is an error;
- `???`, OmegaConf's "required, not set": an error that names the key and where to set it;
- `\\${` is a literal `${`.
Anything else inside `${...}` is an error: kept as it is, it would become the value (a model called
`${oc.env:POLICY_MODEL_NAME,fake-model}`). A lone placeholder keeps the type of what it names (a number
stays a number); one inside a longer string is written into it as text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relay.errors import ConfigError

MISSING = "???"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?[0-9]+[eE][+-]?[0-9]+")


class Variables:
    """Where `${name}` is looked up. `unset(name)` and `missing(key)` finish the error lines: where to set
    a variable nobody defines, and where to set a key left at `???`."""

    def __init__(
        self, sources: Sequence[Mapping[str, Any]], unset: Callable[[str], str], missing: Callable[[str], str]
    ) -> None:
        self.sources = sources
        self.unset = unset
        self.missing = missing
        self._resolving: list[str] = []  # the variables being resolved now, to refuse a cycle

    def resolve(self, value: Any, key: str) -> Any:
        """`value` with every placeholder replaced; `key` names it in errors (`retry.max_attempts`)."""
        if isinstance(value, str):
            if value == MISSING:
                raise ConfigError(f"{key} is ??? (required, not set): {self.missing(key)}")
            return self._text(value, key) if "${" in value else value
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    def _text(self, text: str, key: str) -> Any:
        parts: list[str] = []
        start = 0
        while (opening := text.find("${", start)) >= 0:
            if opening > 0 and text[opening - 1] == "\\":
                parts.append(text[start : opening - 1] + "${")
                start = opening + 2
                continue
            closing = _closing(text, opening + 2)
            if closing < 0:
                raise ConfigError(f"{key}: a `${{` without its `}}`")
            value = self._evaluate(text[opening + 2 : closing], key)
            if opening == 0 and closing == len(text) - 1:
                return value
            parts.append(text[start:opening])
            parts.append(str(value))
            start = closing + 1
        parts.append(text[start:])
        return "".join(parts)

    def _evaluate(self, expression: str, key: str) -> Any:
        if expression.startswith("oc.env:"):
            return self._environment(expression.removeprefix("oc.env:"), key)
        name = expression.strip()
        if _NAME.fullmatch(name):
            return self._variable(name, key)
        raise ConfigError(
            f"{key}: ${{{expression}}} is not a placeholder the relay resolves "
            "(it resolves ${name}, ${a.b}, ${oc.env:VAR} and ${oc.env:VAR,default})"
        )

    def _environment(self, arguments: str, key: str) -> Any:
        comma = _top_level_comma(arguments)
        name = (arguments if comma < 0 else arguments[:comma]).strip()
        if not _ENV_VAR.fullmatch(name):
            raise ConfigError(f"{key}: ${{oc.env:{arguments}}} must name an environment variable")
        if name in os.environ:
            return os.environ[name]
        if comma < 0:
            raise ConfigError(f"{key}: ${{oc.env:{name}}} is not set; export {name}, or give a default: ${{oc.env:{name},default}}")
        return self._default(arguments[comma + 1 :].strip(), key)

    def _default(self, text: str, key: str) -> str | None:
        """As OmegaConf's oc.env: the default is text, whatever literal it was written as, except null."""
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        lowered = text.lower()
        if lowered == "null":
            return None
        if lowered in ("true", "false"):
            return lowered.capitalize()
        if _INT.fullmatch(text):
            return str(int(text))
        if _FLOAT.fullmatch(text):
            return str(float(text))
        if "${" in text:
            value = self._text(text, key)
            return None if value is None else str(value)
        return text

    def _variable(self, name: str, key: str) -> Any:
        if name in self._resolving:
            raise ConfigError(f"{key}: ${{{name}}} refers to itself (through {' -> '.join(self._resolving)})")
        head, *path = name.split(".")
        for source in self.sources:
            if source.get(head) is None:
                continue
            value = source[head]
            for part in path:
                if not isinstance(value, dict) or part not in value:
                    raise ConfigError(f"{key}: ${{{name}}} names no value ({head} has no {'.'.join(path)})")
                value = value[part]
            self._resolving.append(name)
            try:
                return self.resolve(value, name)
            finally:
                self._resolving.pop()
        if not path:
            for env_name in (name, name.upper()):
                if os.environ.get(env_name):
                    return os.environ[env_name]
        raise ConfigError(f"{key}: ${{{name}}} is not set; {self.unset(name)}")


def _closing(text: str, start: int) -> int:
    """The index of the `}` that closes a placeholder whose expression starts at `start`, or -1; nested
    placeholders and quoted text (an oc.env default like 'a}b') are skipped."""
    depth = 1
    quote = ""
    index = start
    while index < len(text):
        char = text[index]
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "$" and text.startswith("${", index):
            depth += 1
            index += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return -1


def _top_level_comma(arguments: str) -> int:
    """The comma between an oc.env variable and its default (not one inside quotes or a nested placeholder)."""
    depth = 0
    quote = ""
    for index, char in enumerate(arguments):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            return index
    return -1
