"""Errors the relay raises at start-up, phrased for the person who has to fix them."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem: one line that names the key and where to set it, never a value."""
