"""Credentials out of everything a person or MLflow reads: one redaction for URLs and text.

URLs carry credentials in two places: userinfo (``https://user:token@host/``) and the query
string (signed URLs, ``?token=...``). Every log line, MLflow param, manifest entry and error
message that may hold a URL goes through ``redact_url`` (or ``scrub`` for a library's error
text about a known URL). Local paths and URLs without either part pass through unchanged.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "<redacted>"

_USERINFO = re.compile(r"(?<=://)[^/\s@'\"]+@")
_QUERY_IN_URL = re.compile(r"(\w+://[^\s'\"?]*)\?[^\s'\")]+")
_QUERY_ANYWHERE = re.compile(r"\?[^\s'\")]+")


def redact_url(text: str, mask: str = MASK) -> str:
    """``text`` (one URL, or free text holding URLs) with every URL's userinfo and query
    string replaced by ``mask``."""
    text = _USERINFO.sub(f"{mask}@", text)
    return _QUERY_IN_URL.sub(lambda m: f"{m.group(1)}?{mask}", text)


def scrub(text: str, url: str, mask: str = MASK) -> str:
    """``text`` (a library's error message about ``url``) with the secret parts of ``url``
    replaced wherever they appear, decoded or not, and every query string and userinfo in it
    redacted too (HTTP libraries quote the path without its scheme, and a redirect may have
    led to a signed URL)."""
    parts = urlsplit(url)
    secrets = [parts.query, unquote(parts.query), parts.password, parts.username]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, mask)
    return redact_url(_QUERY_ANYWHERE.sub(f"?{mask}", text), mask)
