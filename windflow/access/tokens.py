"""Session tokens: minting and verifying EdDSA-signed JWTs. Pure logic, no I/O.

A tenant's API key mints short-lived tokens scoped to models, regions, a session cap and a
streaming budget; every Windflow call carries one. Tokens are signed with an Ed25519 key
named by the ``kid`` header, so keys can rotate: a new key signs while old ones keep
verifying until they are retired. ``TokenVerifier`` runs on every RPC, so it keeps verified
claims in a small LRU cache and redoes only the checks that can change (time, the signing
key's state, the API key's revocation) on each call.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from windflow.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
)

ALGORITHM = "EdDSA"
ISSUER = "windflow"
MAX_TTL_S = 30 * 24 * 3600.0
NBF_LEEWAY_S = 5.0
"""How far a token's ``nbf`` may lie in the future and still pass: the gateway that minted
it and the service that checks it read different clocks. Expiry gets no leeway: ``exp`` is
the lifetime the issuer promised, and a token a few seconds short of it costs nothing."""
CACHE_ENTRIES = 4096
MAX_TOKEN_CHARS = 8192
"""Longer strings are refused unparsed: no token we mint comes near, and parsing is work
an unauthenticated caller could make us do."""

TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_tenant(tenant: str) -> str:
    """Tenant names appear in etcd keys, metrics and logs: keep them to a safe alphabet."""
    if not isinstance(tenant, str) or TENANT_RE.fullmatch(tenant) is None:
        raise InvalidArgument(
            f"tenant {tenant!r} is invalid: 1 to 64 characters of A-Z a-z 0-9 . _ -"
        )
    return tenant


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants. Empty ``models``/``regions`` mean any; zero
    ``max_sessions``/``budget_s`` mean no cap."""

    tenant: str
    key_id: str
    """The API key that minted the token: revoking it revokes the token."""
    models: tuple[str, ...]
    regions: tuple[str, ...]
    max_sessions: int
    budget_s: float
    iat: int
    nbf: int
    exp: int
    jti: str
    kid: str

    def allows_model(self, model_id: str) -> bool:
        return not self.models or model_id in self.models

    def allows_region(self, region: str) -> bool:
        """Whether a session may be placed in ``region``.

        A session spec's empty region means "anywhere", which only an unscoped token
        grants: with a region-scoped token ``allows_region("")`` is False, and the gateway
        is expected to default the spec's region to ``regions[0]`` before asking. Saying
        False here keeps a caller that forgets to do so from placing a scoped session
        anywhere at all.
        """
        if not self.regions:
            return True
        return region != "" and region in self.regions


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An Ed25519 token signing key. ``private_key`` is None where only the public half
    is known (a retired key, or a verifier's copy)."""

    kid: str
    private_key: Ed25519PrivateKey | None
    public_key: Ed25519PublicKey
    created_unix_ms: int
    retired: bool = False

    @classmethod
    def generate(cls, now_unix_ms: int | None = None) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        return cls(
            kid="k" + secrets.token_hex(6),
            private_key=private,
            public_key=private.public_key(),
            created_unix_ms=int(time.time() * 1000) if now_unix_ms is None else now_unix_ms,
        )

    def public_only(self) -> SigningKey:
        """This key without its private half: what a verifier needs, and all it should hold."""
        return SigningKey(self.kid, None, self.public_key, self.created_unix_ms, self.retired)

    def public_bytes(self) -> bytes:
        return self.public_key.public_bytes_raw()

    def to_record(self, include_private: bool = True) -> bytes:
        """JSON for etcd: raw keys in base64. Leave the private half out where nothing
        will ever sign with it again (a retired key)."""
        record: dict[str, Any] = {
            "kid": self.kid,
            "alg": ALGORITHM,
            "public": base64.b64encode(self.public_bytes()).decode(),
            "created_unix_ms": self.created_unix_ms,
            "retired": self.retired,
        }
        if include_private and self.private_key is not None:
            raw = self.private_key.private_bytes_raw()
            record["private"] = base64.b64encode(raw).decode()
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def from_record(cls, data: bytes) -> SigningKey:
        try:
            record = json.loads(data)
            kid = record["kid"]
            public = Ed25519PublicKey.from_public_bytes(
                base64.b64decode(record["public"], validate=True)
            )
            private = None
            if record.get("private"):
                private = Ed25519PrivateKey.from_private_bytes(
                    base64.b64decode(record["private"], validate=True)
                )
            created = record["created_unix_ms"]
            retired = record["retired"]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise DataLoss(f"signing key record is corrupt: {type(exc).__name__}") from exc
        if not isinstance(kid, str) or not kid or not isinstance(created, int):
            raise DataLoss("signing key record is corrupt: bad kid or created_unix_ms")
        if not isinstance(retired, bool) or record.get("alg", ALGORITHM) != ALGORITHM:
            raise DataLoss(f"signing key record {kid} is corrupt: bad retired or alg")
        if private is not None and private.public_key().public_bytes_raw() != (
            public.public_bytes_raw()
        ):
            raise DataLoss(f"signing key record {kid} is corrupt: its halves do not match")
        return cls(kid, private, public, created, retired)


def mint(
    key: SigningKey,
    *,
    tenant: str,
    key_id: str,
    models: Sequence[str] = (),
    regions: Sequence[str] = (),
    max_sessions: int = 0,
    budget_s: float = 0.0,
    ttl_s: float = 3600.0,
    now: float | None = None,
    jti: str | None = None,
) -> tuple[str, Claims]:
    """Sign a token for ``tenant`` with ``key``; returns it and the claims it carries.

    Times are whole seconds (JWT NumericDate); the lifetime is ``ttl_s`` rounded, at
    least one second.
    """
    if key.retired or key.private_key is None:
        raise FailedPrecondition(f"signing key {key.kid} is retired or has no private half")
    check_tenant(tenant)
    if not 0 < ttl_s <= MAX_TTL_S:  # also refuses NaN
        raise InvalidArgument(f"ttl_s must be in (0, {MAX_TTL_S:.0f}] seconds, not {ttl_s}")
    if not 0 <= budget_s < float("inf"):
        raise InvalidArgument(f"budget_s must be >= 0 (0: no cap), not {budget_s}")
    if max_sessions < 0:
        raise InvalidArgument(f"max_sessions must be >= 0 (0: no cap), not {max_sessions}")
    for kind, names in (("model", models), ("region", regions)):
        if any(not isinstance(name, str) or not name for name in names):
            raise InvalidArgument(f"every {kind} a token is scoped to must be a non-empty string")
    iat = int(time.time() if now is None else now)
    claims = Claims(
        tenant=tenant,
        key_id=key_id,
        models=tuple(models),
        regions=tuple(regions),
        max_sessions=int(max_sessions),
        budget_s=float(budget_s),
        iat=iat,
        nbf=iat,
        exp=iat + max(1, round(ttl_s)),
        jti=uuid.uuid4().hex if jti is None else jti,
        kid=key.kid,
    )
    payload = {
        "iss": ISSUER,
        "sub": tenant,
        "iat": claims.iat,
        "nbf": claims.nbf,
        "exp": claims.exp,
        "jti": claims.jti,
        "tenant": tenant,
        "key": key_id,
        "models": list(claims.models),
        "regions": list(claims.regions),
        "max_sessions": claims.max_sessions,
        "budget_s": claims.budget_s,
    }
    token = jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
    return token, claims


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The token of a gRPC call's ``authorization: Bearer <token>`` metadata."""
    values = [value for name, value in metadata if name.lower() == "authorization"]
    if not values:
        raise Unauthenticated("no credential: send metadata 'authorization: Bearer <token>'")
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise Unauthenticated("authorization header is not ASCII") from None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated("authorization header must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise Unauthenticated("authorization header carries an empty bearer token")
    return token


@dataclass(frozen=True, slots=True)
class _Verifying:
    """What the verifier knows of one signing key: enough to check, nothing to sign."""

    public_key: Ed25519PublicKey
    retired: bool


class TokenVerifier:
    """Checks tokens against the known signing keys and revoked API keys.

    Feed it with ``update_keys``/``update_revoked`` (``windflow.access.keys.AccessView``
    keeps one current from etcd). A token whose signature and claims checked out once is
    cached (LRU, ``CACHE_ENTRIES``); each call, cached or not, still checks its times
    against ``now``, that its signing key is known and not retired, and that its API key
    is not revoked. ``cache_hits``/``cache_misses`` count lookups.
    """

    def __init__(self, cache_entries: int = CACHE_ENTRIES) -> None:
        self._keys: dict[str, _Verifying] = {}
        self._revoked: frozenset[str] = frozenset()
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._cache_entries = cache_entries
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @property
    def revoked(self) -> frozenset[str]:
        return self._revoked

    def update_keys(self, keys: Iterable[SigningKey]) -> None:
        """Replace the known signing keys. The cache goes too: a key's material could
        have changed under the same kid, and the cache vouches for signatures."""
        self._keys = {key.kid: _Verifying(key.public_key, key.retired) for key in keys}
        self._cache.clear()

    def update_revoked(self, key_ids: Iterable[str]) -> None:
        """Replace the set of revoked API key ids (checked on every call; the cache stays)."""
        self._revoked = frozenset(key_ids)

    def verify(self, token: str, now: float | None = None) -> Claims:
        """The claims of a valid token; ``Unauthenticated`` saying which check failed."""
        if not token:
            raise Unauthenticated("no token: the call carries no credential")
        claims = self._cache.get(token)
        if claims is None:
            self.cache_misses += 1
            claims = self._verify_signed(token)
            self._cache[token] = claims
            if len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        else:
            self.cache_hits += 1
            self._cache.move_to_end(token)
        self._check_current(claims, time.time() if now is None else now)
        return claims

    def _signing_key(self, kid: str) -> _Verifying:
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated(f"token signing key {kid[:32]!r} is unknown")
        if key.retired:
            raise Unauthenticated(f"token signing key {kid!r} is retired")
        return key

    def _check_current(self, claims: Claims, now: float) -> None:
        """The checks whose answer changes over time: redone on every call."""
        self._signing_key(claims.kid)
        if now >= claims.exp:
            raise Unauthenticated(f"token expired {now - claims.exp:.0f} s ago")
        if now + NBF_LEEWAY_S < claims.nbf:
            raise Unauthenticated(
                f"token not valid for another {claims.nbf - now:.0f} s (nbf in the future"
                f" beyond the {NBF_LEEWAY_S:.0f} s clock-skew leeway)"
            )
        if claims.key_id in self._revoked:
            raise Unauthenticated(f"the API key {claims.key_id} that minted the token is revoked")

    def _verify_signed(self, token: str) -> Claims:
        """Signature and claim checks: done once per token string, then cached."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise Unauthenticated("malformed token: not three base64url segments")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("malformed token: undecodable header") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated(f"token algorithm is not {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token header names no signing key (kid)")
        key = self._signing_key(kid)
        try:
            payload = jwt.decode(
                token,
                key.public_key,
                algorithms=[ALGORITHM],
                options={
                    "verify_exp": False,  # time checks are ours, on every call
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature is invalid (forged or altered)") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("malformed token: undecodable payload") from None
        return _claims(payload, kid)


def _claim(payload: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(name)
    if value is None:
        raise Unauthenticated(f"token claim {name!r} is missing")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise Unauthenticated(f"token claim {name!r} has the wrong type")
    return value


def _strings(payload: Mapping[str, Any], name: str) -> tuple[str, ...]:
    values = _claim(payload, name, list)
    if not all(isinstance(value, str) for value in values):
        raise Unauthenticated(f"token claim {name!r} has the wrong type")
    return tuple(values)


def _claims(payload: Mapping[str, Any], kid: str) -> Claims:
    if _claim(payload, "iss", str) != ISSUER:
        raise Unauthenticated(f"token issuer is not {ISSUER!r}")
    tenant = _claim(payload, "tenant", str)
    if _claim(payload, "sub", str) != tenant:
        raise Unauthenticated("token claims 'sub' and 'tenant' differ")
    max_sessions = _claim(payload, "max_sessions", int)
    budget_s = _claim(payload, "budget_s", (int, float))
    if max_sessions < 0 or budget_s < 0:
        raise Unauthenticated("token claim 'max_sessions' or 'budget_s' is negative")
    return Claims(
        tenant=tenant,
        key_id=_claim(payload, "key", str),
        models=_strings(payload, "models"),
        regions=_strings(payload, "regions"),
        max_sessions=max_sessions,
        budget_s=float(budget_s),
        iat=int(_claim(payload, "iat", (int, float))),
        nbf=int(_claim(payload, "nbf", (int, float))),
        exp=int(_claim(payload, "exp", (int, float))),
        jti=_claim(payload, "jti", str),
        kid=kid,
    )
