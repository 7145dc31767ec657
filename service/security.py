"""Security headers: ``X-Content-Type-Options: nosniff`` on every response, and on HTML pages a
``Content-Security-Policy`` (nothing from another host, no framing) with ``X-Frame-Options: DENY``.

The pages are the studio (``/``, ``/studio``: its own script and style files only) and the API docs (``/docs``,
``/redoc``), whose scripts and styles are vendored under ``service/static/docs`` and served from here. Swagger UI's
page starts it with an inline script, allowed by its hash; ReDoc writes its styles into ``<style>`` elements at run
time (styled-components) and runs its search in a worker made from a ``blob:`` URL, so its page allows inline
styles and blob workers. Images, and fetches, may be ``data:`` and ``blob:`` URLs (the studio's previews and
result, Swagger UI's icons): those are the page's own data. ReDoc's "powered by" logo, which it loads from
cdn.redoc.ly, is blocked (the docs work offline, and the page loads nothing from another host).
"""

from __future__ import annotations

import base64
import hashlib
import re

_INLINE = re.compile(r"<(script|style)(\s[^>]*)?>(.*?)</\1>", re.DOTALL | re.IGNORECASE)

BASE_POLICY = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data: blob:",
    "font-src": "'self' data:",
    "connect-src": "'self' blob: data:",  # fetching the page's own object URLs (the studio's result)
    "worker-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
DEFAULT_CSP = "; ".join(f"{k} {v}" for k, v in BASE_POLICY.items())


def page_policy(html: str, *, inline_styles: bool = False, blob_workers: bool = False) -> str:
    """The policy for one page: the base one, plus the hashes of its inline scripts and styles."""
    policy = dict(BASE_POLICY)
    for tag, attributes, content in _INLINE.findall(html):
        if tag.lower() == "script" and "src=" in (attributes or ""):
            continue
        if not content.strip():
            continue
        digest = base64.b64encode(hashlib.sha256(content.encode("utf-8")).digest()).decode("ascii")
        key = "script-src" if tag.lower() == "script" else "style-src"
        policy[key] += f" 'sha256-{digest}'"
    if inline_styles:
        policy["style-src"] = "'self' 'unsafe-inline'"  # hashes would switch 'unsafe-inline' off
    if blob_workers:
        policy["worker-src"] = "'self' blob:"
    return "; ".join(f"{k} {v}" for k, v in policy.items())


def page_headers(policy: str) -> dict[str, str]:
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY"}
