"""API keys on the /v1 routes: who is asking, what they may do, how fast.

A key is `lc-sk-…` (secret: every /v1 route, from a server) or `lc-pk-…` (public: put in a web
page for the rating widget; it may only rate, from its listed origins). The database keeps a
SHA-256 of each key, never the key. Every key belongs to a site; completions record the site of
the key that asked, and only that site's keys may rate them.

Outside development mode (or with `access.require_keys`), /v1 routes need a key. Each key has a
request rate and a number of requests in flight (its own, or the defaults); over either the
answer is 429 with Retry-After. Limits are kept per process: with N replicas behind a balancer a
key gets up to N times its rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select
from starlette.middleware.cors import CORSMiddleware

from feedback.models import ApiKey
from loopchat.settings import AccessSettings
from serving.errors import APIError, request_header

logger = logging.getLogger(__name__)

PREFIXES = {"secret": "lc-sk-", "public": "lc-pk-"}
# What create_key hands out: a prefix, then secrets.token_urlsafe(32), 43 characters of base64url.
_KEY_SHAPE = re.compile(r"lc-[sp]k-[A-Za-z0-9_-]{43}")
# What a public key may call: rating, from a browser.
PUBLIC_ROUTES = ("/v1/feedback", "/v1/feedback/preference")
# vLLM's server has its tokenizer routes beside /v1; they take keys and limits as /v1 does.
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path in TOKENIZER_ROUTES


def is_key_shaped(token: str) -> bool:
    """Whether `token` could be a loopchat key at all; anything else is refused unseen."""
    return _KEY_SHAPE.fullmatch(token) is not None


def hash_key(token: str) -> str:
    # Keys are 256 random bits: a plain hash is as strong as a slow one here, and cheap per request.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from. `site` None: no key (development mode)."""

    key_id: str | None = None
    site: str | None = None
    kind: str = "secret"
    origins: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    max_concurrent: int | None = None


ANONYMOUS = Principal()


# -- key management (the CLI) ---------------------------------------------------------------------


def create_key(
    database: Engine,
    name: str,
    *,
    site: str | None = None,
    kind: str = "secret",
    origins: list[str] | None = None,
    requests_per_minute: int | None = None,
    max_concurrent: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key; returns its row and the key itself, which is not stored and cannot be shown again."""
    if kind not in PREFIXES:
        raise ValueError("kind must be secret or public")
    if kind == "public" and not origins:
        raise ValueError("a public key needs the origins of the pages that use it (--origin)")
    for origin in origins or []:
        if not origin.startswith(("https://", "http://")) or origin.count("/") != 2:
            raise ValueError(f"origin {origin!r} must look like https://example.com (scheme and host only)")
    if kind == "public" and not site:
        raise ValueError("a public key rates the completions of a site: name it with --site")
    if site is not None:
        with Session(database) as session:
            if session.exec(select(ApiKey.id).where(ApiKey.site == site).limit(1)).first() is None:
                raise ValueError(f"no key belongs to site {site!r}: create the site's secret key first")
    token = PREFIXES[kind] + secrets.token_urlsafe(32)
    key_id = f"key_{uuid.uuid4().hex[:12]}"
    row = ApiKey(
        id=key_id,
        name=name,
        site=site or key_id,
        kind=kind,
        prefix=token[:12],
        hash=hash_key(token),
        origins=list(origins or []),
        requests_per_minute=requests_per_minute,
        max_concurrent=max_concurrent,
    )
    with Session(database) as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    return row, token


def list_keys(database: Engine) -> list[ApiKey]:
    with Session(database) as session:
        return list(session.exec(select(ApiKey).order_by(col(ApiKey.created_at))))


def revoke_key(database: Engine, key_id: str) -> ApiKey:
    with Session(database) as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise LookupError(key_id)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
            session.add(row)
            session.commit()
            session.refresh(row)
        return row


# -- lookup and limits (the service) --------------------------------------------------------------


class KeyStore:
    """Keys by hash, cached for `ttl` seconds: a revocation reaches every replica within it. At
    most `max_cached` are kept and the least recently used goes first, so keys in regular use stay
    cached while a stream of unknown ones passes through."""

    def __init__(self, database: Engine, ttl: float, *, max_cached: int = 100_000) -> None:
        self._database = database
        self._ttl = ttl
        self._max_cached = max_cached
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self.public_origins: frozenset[str] = frozenset()

    async def resolve(self, token: str) -> Principal | None:
        if not is_key_shaped(token):
            return None
        digest = hash_key(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(digest)
            return cached[1]
        principal = await asyncio.to_thread(self._lookup, digest)
        self._cache[digest] = (now + self._ttl, principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return principal

    def _lookup(self, digest: str) -> Principal | None:
        with Session(self._database) as session:
            row = session.exec(select(ApiKey).where(ApiKey.hash == digest)).first()
        if row is None or row.revoked_at is not None:
            return None
        return Principal(
            row.id, row.site, row.kind, tuple(row.origins), row.requests_per_minute, row.max_concurrent
        )

    def _read_origins(self) -> frozenset[str]:
        with Session(self._database) as session:
            rows = session.exec(
                select(ApiKey.origins).where(ApiKey.kind == "public", col(ApiKey.revoked_at).is_(None))
            )
            return frozenset(origin for origins in rows for origin in origins)

    async def run(self) -> None:
        """Keep the CORS allowlist (the public keys' origins) current."""
        while True:
            try:
                self.public_origins = await asyncio.to_thread(self._read_origins)
            except SQLAlchemyError as exc:
                logger.warning("could not read the public keys' origins: %s", exc.__class__.__name__)
            await asyncio.sleep(self._ttl)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    inflight: int = 0


@dataclass(slots=True)
class Limiter:
    """A token bucket (a minute's rate, bursts up to a quarter of it) and an in-flight count per key."""

    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def acquire(self, key: str, per_minute: int, concurrent: int) -> None:
        now = time.monotonic()
        capacity = max(1.0, per_minute / 4)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(capacity, now)
        rate = per_minute / 60
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.inflight >= concurrent:
            raise _too_many(f"this key already has {concurrent} requests in flight", 1)
        if bucket.tokens < 1:
            raise _too_many(
                f"rate limit of {per_minute} requests per minute reached",
                math.ceil((1 - bucket.tokens) / rate),
            )
        bucket.tokens -= 1
        bucket.inflight += 1

    def release(self, key: str) -> None:
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.inflight = max(0, bucket.inflight - 1)


def _too_many(message: str, retry_after: int) -> APIError:
    return APIError(
        429, message, code="rate_limit_exceeded", headers={"Retry-After": str(max(1, retry_after))}
    )


class AccessMiddleware:
    """Authenticates /v1 requests, applies the key's rules and limits, and hands the principal to
    the routes (`request.state.principal`); a stream holds its in-flight slot until it ends."""

    def __init__(self, app, settings: AccessSettings, required: bool, store_of) -> None:
        self.app = app
        self.settings = settings
        self.required = required
        self._store_of = store_of  # the app's KeyStore, created with the database at start-up
        self.limiter = Limiter()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _guarded(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        try:
            principal = await self._authenticate(scope)
        except APIError as error:
            await error.response()(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        if principal.key_id is None:
            await self.app(scope, receive, send)
            return
        try:
            self.limiter.acquire(
                principal.key_id,
                principal.requests_per_minute or self.settings.key_requests_per_minute,
                principal.max_concurrent or self.settings.key_max_concurrent,
            )
        except APIError as error:
            await error.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(principal.key_id)

    async def _authenticate(self, scope) -> Principal:
        authorization = (request_header(scope, b"authorization") or b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if not self.required and not token.startswith(tuple(PREFIXES.values())):
            # Development: OpenAI clients must send some key ("unused", "sk-…"); only a loopchat
            # key is checked, so that keys can be tried out here too.
            return ANONYMOUS
        if not token or scheme.lower() != "bearer":
            if self.required:
                raise APIError(
                    401,
                    "an API key is required: Authorization: Bearer lc-sk-…",
                    code="missing_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return ANONYMOUS
        if not is_key_shaped(token):  # refused before the database (or the key cache) sees it
            raise APIError(
                401,
                "invalid API key: a loopchat key is lc-sk-… or lc-pk-…, 49 characters",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        store: KeyStore | None = self._store_of()
        if store is None:
            raise APIError(
                503, "the service is starting; retry shortly", code="not_ready", headers={"Retry-After": "5"}
            )
        try:
            principal = await store.resolve(token)
        except SQLAlchemyError:
            raise APIError(
                503,
                "keys cannot be checked right now; retry shortly",
                code="keys_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        if principal is None:
            raise APIError(
                401,
                "invalid or revoked API key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if principal.kind == "public":
            if scope["path"] not in PUBLIC_ROUTES:
                raise APIError(
                    403,
                    "a public key may only rate completions (POST /v1/feedback)",
                    code="public_key_not_allowed",
                )
            origin = (request_header(scope, b"origin") or b"").decode("latin-1")
            if origin and origin not in principal.origins:
                raise APIError(403, f"this key is not for pages on {origin}", code="origin_not_allowed")
        return principal


class KeyOriginsCORS(CORSMiddleware):
    """CORS for browsers on sites with a public key (plus `access.cors_origins`), read at request
    time so a new key's origins work without a restart."""

    def __init__(self, app, settings: AccessSettings, store_of) -> None:
        super().__init__(
            app,
            allow_origins=[],
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
            expose_headers=["x-loopchat-completion-id", "x-loopchat-conversation-id", "retry-after"],
            max_age=600,
        )
        self._configured = frozenset(settings.cors_origins)
        self._store_of = store_of

    async def __call__(self, scope, receive, send) -> None:
        # Most requests come from servers, without an Origin: nothing for CORS to do.
        if scope["type"] != "http" or not request_header(scope, b"origin"):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def is_allowed_origin(self, origin: str) -> bool:
        store = self._store_of()
        return origin in self._configured or (store is not None and origin in store.public_origins)
