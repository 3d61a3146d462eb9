"""The demo chat page (GET /) and the feedback widget (GET /widget.js), from feedback/static.

Both files ship inside the `feedback` package and are read once, at import. Each response has a
strong ETag (a revalidation costs a 304 and no body); the page also carries a Content Security
Policy that allows only its own inline script (by hash) and same-origin requests.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["ui"], include_in_schema=False)

# The widget may change with a deploy: browsers reuse it for five minutes, then revalidate.
WIDGET_CACHE_CONTROL = "public, max-age=300"
PAGE_CACHE_CONTROL = "no-cache"

_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _read(name: str) -> bytes:
    return resources.files("feedback").joinpath("static", name).read_bytes()


def _content_security_policy(page: bytes) -> str:
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'self'"
    )


class _Asset:
    def __init__(self, body: bytes, media_type: str, headers: dict[str, str]) -> None:
        self.body = body
        self.media_type = media_type
        self.etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        self.headers = {**headers, "ETag": self.etag, "X-Content-Type-Options": "nosniff"}

    def response(self, request: Request) -> Response:
        if self._matches(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=self.headers)
        return Response(self.body, media_type=self.media_type, headers=self.headers)

    def _matches(self, header: str | None) -> bool:
        if not header:
            return False
        # Weak comparison, as RFC 9110 asks for If-None-Match: W/"x" matches "x".
        tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
        return "*" in tags or self.etag in tags


_page_body = _read("index.html")
_PAGE = _Asset(
    _page_body,
    "text/html; charset=utf-8",
    {
        "Cache-Control": PAGE_CACHE_CONTROL,
        "Content-Security-Policy": _content_security_policy(_page_body),
        "Referrer-Policy": "no-referrer",
    },
)
_WIDGET = _Asset(
    _read("widget.js"),
    "application/javascript; charset=utf-8",
    {"Cache-Control": WIDGET_CACHE_CONTROL},
)


@router.api_route("/", methods=["GET", "HEAD"])
async def demo_page(request: Request) -> Response:
    """A minimal chat page that streams answers and carries the feedback widget."""
    return _PAGE.response(request)


@router.api_route("/widget.js", methods=["GET", "HEAD"])
async def widget_script(request: Request) -> Response:
    """The feedback widget: one script tag adds ratings under each assistant message."""
    return _WIDGET.response(request)
