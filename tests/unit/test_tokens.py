"""Session tokens: minting, every way a token is refused, scopes, the verifier's cache,
and reading the bearer token off gRPC metadata."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from windflow.access import tokens
from windflow.access.tokens import Claims, SigningKey, TokenVerifier, bearer, mint
from windflow.errors import DataLoss, FailedPrecondition, InvalidArgument, Unauthenticated

NOW = 1_700_000_000.0


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def verifier(key: SigningKey) -> TokenVerifier:
    verifier = TokenVerifier()
    verifier.update_keys([key])
    return verifier


def _mint(key: SigningKey, **overrides: Any) -> tuple[str, Claims]:
    args: dict[str, Any] = {"tenant": "acme", "key_id": "0123456789ab", "now": NOW}
    args.update(overrides)
    return mint(key, **args)


def _refused(verifier: TokenVerifier, token: str, match: str, now: float = NOW + 1) -> None:
    with pytest.raises(Unauthenticated, match=match) as caught:
        verifier.verify(token, now=now)
    if token:
        assert token not in caught.value.message  # never echoed


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _payload(claims: Claims) -> dict[str, Any]:
    return {
        "iss": "windflow",
        "sub": claims.tenant,
        "iat": claims.iat,
        "nbf": claims.nbf,
        "exp": claims.exp,
        "jti": claims.jti,
        "tenant": claims.tenant,
        "key": claims.key_id,
        "models": list(claims.models),
        "regions": list(claims.regions),
        "max_sessions": claims.max_sessions,
        "budget_s": claims.budget_s,
    }


def _sign(key: SigningKey, payload: dict[str, Any]) -> str:
    assert key.private_key is not None
    return jwt.encode(payload, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})


def test_round_trip_carries_every_claim(key: SigningKey, verifier: TokenVerifier) -> None:
    token, claims = _mint(
        key,
        models=("wan-1.3b", "sim"),
        regions=("eu-west",),
        max_sessions=3,
        budget_s=120.5,
        ttl_s=600,
        jti="fixedjti",
    )
    assert claims == Claims(
        tenant="acme",
        key_id="0123456789ab",
        models=("wan-1.3b", "sim"),
        regions=("eu-west",),
        max_sessions=3,
        budget_s=120.5,
        iat=int(NOW),
        nbf=int(NOW),
        exp=int(NOW) + 600,
        jti="fixedjti",
        kid=key.kid,
    )
    assert verifier.verify(token, now=NOW + 1) == claims
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == key.kid
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["iss"] == "windflow" and raw["sub"] == "acme" and raw["key"] == "0123456789ab"


def test_defaults_mean_no_scope_and_a_random_jti(key: SigningKey, verifier: TokenVerifier) -> None:
    token, claims = _mint(key)
    other, other_claims = _mint(key)
    assert claims.models == () == claims.regions
    assert (claims.max_sessions, claims.budget_s, claims.exp - claims.iat) == (0, 0.0, 3600)
    assert len(claims.jti) == 32 and claims.jti != other_claims.jti and token != other
    assert verifier.verify(token, now=NOW) == claims


def test_missing_token(verifier: TokenVerifier) -> None:
    _refused(verifier, "", "no token")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "!!!.###.$$$",
        f"{_b64(b'not json')}.{_b64(b'{}')}.{_b64(b'sig')}",
        f"{_b64(b'[1, 2]')}.{_b64(b'{}')}.{_b64(b'sig')}",
        "x" * 9000,
    ],
)
def test_malformed_tokens(verifier: TokenVerifier, token: str) -> None:
    _refused(verifier, token, "malformed token")


def test_signed_payload_that_is_no_json_object(key: SigningKey, verifier: TokenVerifier) -> None:
    assert key.private_key is not None
    header = _mint(key)[0].split(".")[0]
    signing_input = f"{header}.{_b64(b'[1, 2]')}"
    signature = _b64(key.private_key.sign(signing_input.encode()))
    _refused(verifier, f"{signing_input}.{signature}", "malformed token: undecodable payload")


def test_forged_by_another_key_with_the_same_kid(key: SigningKey, verifier: TokenVerifier) -> None:
    impostor_private = Ed25519PrivateKey.generate()
    impostor = SigningKey(key.kid, impostor_private, impostor_private.public_key(), 0)
    token, _ = _mint(impostor)
    _refused(verifier, token, "signature is invalid")


def test_tampered_payload_keeps_no_signature(key: SigningKey, verifier: TokenVerifier) -> None:
    token, claims = _mint(key, budget_s=10.0)
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert data["budget_s"] == 10.0
    data["budget_s"] = 1e9
    tampered = f"{header}.{_b64(json.dumps(data).encode())}.{signature}"
    _refused(verifier, tampered, "signature is invalid")
    assert verifier.verify(token, now=NOW + 1) == claims  # the original still passes


def test_expired(key: SigningKey, verifier: TokenVerifier) -> None:
    token, claims = _mint(key, ttl_s=60)
    assert verifier.verify(token, now=claims.exp - 0.001) == claims
    _refused(verifier, token, "expired", now=claims.exp)
    _refused(verifier, token, "expired", now=claims.exp + 3600)


def test_not_yet_valid_beyond_the_clock_skew_leeway(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token, claims = _mint(key, now=NOW + 60)
    _refused(verifier, token, "not valid for another 60 s", now=NOW)
    assert verifier.verify(token, now=claims.nbf - tokens.NBF_LEEWAY_S) == claims


def test_unknown_and_retired_signing_keys(key: SigningKey, verifier: TokenVerifier) -> None:
    token, _ = _mint(key)
    stranger = TokenVerifier()
    stranger.update_keys([SigningKey.generate()])
    _refused(stranger, token, "unknown")
    verifier.update_keys([dataclasses.replace(key, retired=True)])
    _refused(verifier, token, "retired")


def test_revoked_api_key(key: SigningKey, verifier: TokenVerifier) -> None:
    token, claims = _mint(key)
    verifier.update_revoked(["someone-else"])
    assert verifier.verify(token, now=NOW) == claims
    verifier.update_revoked([claims.key_id])
    _refused(verifier, token, "revoked")


def test_other_algorithms_are_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    _, claims = _mint(key)
    payload = _payload(claims)
    hs256 = jwt.encode(payload, "s" * 64, algorithm="HS256", headers={"kid": key.kid})
    _refused(verifier, hs256, "algorithm is not EdDSA")
    # HS256 "signed" with the public key's bytes: the classic key-confusion attack
    confused = jwt.encode(payload, key.public_bytes(), algorithm="HS256", headers={"kid": key.kid})
    _refused(verifier, confused, "algorithm is not EdDSA")
    header = json.dumps({"alg": "none", "typ": "JWT", "kid": key.kid}).encode()
    unsigned = f"{_b64(header)}.{_b64(json.dumps(payload).encode())}."
    _refused(verifier, unsigned, "algorithm is not EdDSA")


def test_header_without_kid(key: SigningKey, verifier: TokenVerifier) -> None:
    assert key.private_key is not None
    _, claims = _mint(key)
    token = jwt.encode(_payload(claims), key.private_key, algorithm="EdDSA")
    _refused(verifier, token, "kid")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"budget_s": None}, "'budget_s' is missing"),
        ({"tenant": None}, "'tenant' is missing"),
        ({"exp": None}, "'exp' is missing"),
        ({"models": "wan"}, "'models' has the wrong type"),
        ({"regions": [1]}, "'regions' has the wrong type"),
        ({"max_sessions": 1.5}, "'max_sessions' has the wrong type"),
        ({"max_sessions": True}, "'max_sessions' has the wrong type"),
        ({"exp": "soon"}, "'exp' has the wrong type"),
        ({"iss": "elsewhere"}, "issuer"),
        ({"sub": "other-tenant"}, "'sub' and 'tenant' differ"),
    ],
)
def test_missing_or_mistyped_claims(
    key: SigningKey, verifier: TokenVerifier, change: dict[str, Any], match: str
) -> None:
    _, claims = _mint(key)
    payload = _payload(claims)
    for name, value in change.items():
        if value is None:
            del payload[name]
        else:
            payload[name] = value
    _refused(verifier, _sign(key, payload), match)


def test_scope_helpers(key: SigningKey) -> None:
    _, anything = _mint(key)
    assert (
        anything.allows_model("wan")
        and anything.allows_region("eu")
        and (anything.allows_region(""))
    )
    _, scoped = _mint(key, models=["wan"], regions=["eu", "us"])
    assert scoped.allows_model("wan") and not scoped.allows_model("sim")
    assert scoped.allows_region("eu") and scoped.allows_region("us")
    assert not scoped.allows_region("ap") and not scoped.allows_region("")


def test_cache_hits_but_still_checks_time_keys_and_revocation(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token, claims = _mint(key, ttl_s=60)
    assert verifier.verify(token, now=NOW) == claims
    assert (verifier.cache_misses, verifier.cache_hits, verifier.cache_size) == (1, 0, 1)
    assert verifier.verify(token, now=NOW + 1) == claims
    assert (verifier.cache_misses, verifier.cache_hits) == (1, 1)

    _refused(verifier, token, "expired", now=claims.exp)  # cached, and expired all the same
    assert verifier.cache_hits == 2

    verifier.update_revoked([claims.key_id])
    _refused(verifier, token, "revoked")
    assert verifier.cache_hits == 3
    verifier.update_revoked([])
    assert verifier.verify(token, now=NOW + 2) == claims

    verifier.update_keys([dataclasses.replace(key, retired=True)])
    _refused(verifier, token, "retired")


def test_cache_is_bounded_and_keeps_the_recently_used(key: SigningKey) -> None:
    verifier = TokenVerifier(cache_entries=2)
    verifier.update_keys([key])
    first, second, third = (_mint(key)[0] for _ in range(3))
    verifier.verify(first, now=NOW)
    verifier.verify(second, now=NOW)
    verifier.verify(first, now=NOW)  # first is now the most recent
    verifier.verify(third, now=NOW)  # evicts second
    assert verifier.cache_size == 2
    misses = verifier.cache_misses
    verifier.verify(first, now=NOW)
    assert verifier.cache_misses == misses
    verifier.verify(second, now=NOW)
    assert verifier.cache_misses == misses + 1


def test_forged_token_is_not_cached(key: SigningKey, verifier: TokenVerifier) -> None:
    impostor_private = Ed25519PrivateKey.generate()
    impostor = SigningKey(key.kid, impostor_private, impostor_private.public_key(), 0)
    token, _ = _mint(impostor)
    _refused(verifier, token, "signature")
    _refused(verifier, token, "signature")
    assert verifier.cache_size == 0 and verifier.cache_hits == 0


def test_mint_refusals(key: SigningKey) -> None:
    with pytest.raises(FailedPrecondition):
        _mint(dataclasses.replace(key, retired=True))
    with pytest.raises(FailedPrecondition):
        _mint(key.public_only())
    for ttl_s in (0.0, -1.0, tokens.MAX_TTL_S + 1, float("nan")):
        with pytest.raises(InvalidArgument, match="ttl_s"):
            _mint(key, ttl_s=ttl_s)
    for budget_s in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="budget_s"):
            _mint(key, budget_s=budget_s)
    with pytest.raises(InvalidArgument, match="max_sessions"):
        _mint(key, max_sessions=-1)
    with pytest.raises(InvalidArgument, match="model"):
        _mint(key, models=[""])
    for tenant in ("", "a b", "x" * 65, "ten/ant"):
        with pytest.raises(InvalidArgument, match="tenant"):
            _mint(key, tenant=tenant)
    assert _mint(key, ttl_s=tokens.MAX_TTL_S)[1].exp == int(NOW + tokens.MAX_TTL_S)
    assert _mint(key, ttl_s=0.2)[1].exp == int(NOW) + 1  # at least a second


def test_signing_key_records(key: SigningKey) -> None:
    whole = SigningKey.from_record(key.to_record())
    assert whole.kid == key.kid and whole.created_unix_ms == key.created_unix_ms
    assert whole.private_key is not None and key.private_key is not None
    assert whole.private_key.private_bytes_raw() == key.private_key.private_bytes_raw()
    assert whole.public_bytes() == key.public_bytes() and not whole.retired

    public = SigningKey.from_record(dataclasses.replace(key, retired=True).to_record(False))
    assert public.private_key is None and public.retired
    assert public.public_bytes() == key.public_bytes()
    assert b"private" not in key.to_record(include_private=False)
    assert key.kid.startswith("k") and len(key.kid) == 13

    record = json.loads(key.to_record())
    record["public"] = base64.b64encode(SigningKey.generate().public_bytes()).decode()
    with pytest.raises(DataLoss, match="halves"):
        SigningKey.from_record(json.dumps(record).encode())
    for corrupt in (b"", b"{}", b"[1]", b'{"kid": "k1", "public": "!!"}'):
        with pytest.raises(DataLoss):
            SigningKey.from_record(corrupt)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("authorization", "Bearer tok.en.x")], "tok.en.x"),
        ([("x-other", "1"), ("authorization", "bearer  abc ")], "abc"),
        ([("Authorization", b"BEARER abc")], "abc"),
    ],
)
def test_bearer_reads_the_token(metadata: list[tuple[str, str | bytes]], expected: str) -> None:
    assert bearer(metadata) == expected


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ([], "no credential"),
        ([("x-api-key", "abc")], "no credential"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "Bearer scheme"),
        ([("authorization", "abc")], "Bearer scheme"),
        ([("authorization", "Bearer ")], "empty bearer token"),
        ([("authorization", b"Bearer \xff")], "not ASCII"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "more than one"),
    ],
)
def test_bearer_refusals(metadata: list[tuple[str, str | bytes]], match: str) -> None:
    with pytest.raises(Unauthenticated, match=match):
        bearer(metadata)
