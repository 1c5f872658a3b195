"""The gateway's access control: who a call is (its session token), what it may touch
(tenancy), how much it may spend (budgets) and how fast (quotas). docs/access.md.

Every public Windflow call carries ``authorization: Bearer <session token>``; ``caller``
verifies it (``AccessView``'s verifier: a cache hit after the first call of a token) and
returns its claims. Failures are counted by reason and answered UNAUTHENTICATED; a token
used outside its scope PERMISSION_DENIED; another tenant's session NOT_FOUND, with the
very message an unknown session gets. With ``--insecure`` there is no token and no
tenant (every caller is the same anonymous one), and nothing is checked.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Sequence

from etcd3aio import Etcd3Client, prefix_range_end

from services.gateway.config import Quotas
from windflow.access.keys import AccessView
from windflow.access.tokens import Claims, bearer
from windflow.access.usage import Ledger
from windflow.common import etcd, metrics, names
from windflow.errors import NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)

WARN_AT = (0.8, 0.95)
"""Fractions of a token's budget at which a stream is warned (KIND_BUDGET_WARNING)."""


class RateLimiter:
    """A token bucket per key (pure but for the clock): ``take`` returns 0 when allowed,
    else the seconds until it would be."""

    def __init__(self, rate: float, burst: float, clock: collections.abc.Callable[[], float]):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        level, at = self._buckets.get(key, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.rate)
        if level >= 1.0:
            self._buckets[key] = (level - 1.0, now)
            return 0.0
        self._buckets[key] = (level, now)
        return (1.0 - level) / self.rate


class Access:
    def __init__(
        self,
        client: Etcd3Client,
        view: AccessView | None,
        quotas: Quotas,
        *,
        clock: collections.abc.Callable[[], float] = time.monotonic,
    ) -> None:
        """``view`` None: no authentication (``--insecure``)."""
        self._etcd = client
        self._view = view
        self.quotas = quotas
        self.ledger = Ledger(client)
        self._creates = RateLimiter(quotas.creates_per_s, 2 * quotas.creates_per_s, clock)
        self.refused: collections.Counter[str] = collections.Counter()
        """Calls refused, by reason ("missing token", "expired", "scope: model" ...)."""
        self._metrics = metrics.get()
        for reason in ("tenant_sessions", "create_rate", "budget"):
            self._metrics.quota_refusals.add(0, {"reason": reason})
        self._metrics.auth_refusals.add(
            lambda: [(n, {"reason": reason}) for reason, n in list(self.refused.items())]
        )

    @property
    def secure(self) -> bool:
        return self._view is not None

    def _refuse(self, reason: str, err: Unauthenticated | PermissionDenied) -> None:
        self.refused[reason] += 1
        count = self.refused[reason]
        if count & (count - 1) == 0:  # 1, 2, 4, 8 ...: no log flood from a hostile client
            log.warning("refused (%s, %d so far): %s", reason, count, err.message)

    def caller(self, metadata: Sequence[tuple[str, str | bytes]]) -> Claims | None:
        """The verified claims of a call's token (None when insecure)."""
        if self._view is None:
            return None
        try:
            return self._view.verifier.verify(bearer(metadata))
        except Unauthenticated as err:
            self._refuse(_reason(err.message), err)
            raise

    def _deny(self, reason: str, message: str) -> PermissionDenied:
        err = PermissionDenied(message)
        self._refuse(f"scope: {reason}", err)
        return err

    # ---- tenancy ----

    @staticmethod
    def tenant(claims: Claims | None) -> str:
        return "" if claims is None else claims.tenant

    def check_owner(self, claims: Claims | None, session: pb.Session) -> None:
        """NOT_FOUND, worded as for an unknown session, unless ``claims``' tenant owns it."""
        if claims is not None and session.tenant != claims.tenant:
            raise NotFound(f"unknown session {session.session_id!r}")

    def check_model(self, claims: Claims | None, model_id: str) -> None:
        if claims is not None and not claims.allows_model(model_id):
            raise self._deny("model", f"this token does not grant model {model_id!r}")

    def scope_spec(self, claims: Claims | None, spec: pb.SessionSpec) -> None:
        """Check a new session's model and region against the token; a region-scoped
        token's session with no region asked for goes to the token's first region."""
        if claims is None:
            return
        self.check_model(claims, spec.model_id)
        if not spec.region and claims.regions:
            spec.region = claims.regions[0]
        if not claims.allows_region(spec.region):
            raise self._deny("region", f"this token does not grant region {spec.region!r}")

    async def admit(self, claims: Claims | None, count: int = 1) -> None:
        """``count`` more sessions for the caller's tenant (a create, a fork, or ForkMany's
        forks): the token's session cap (PERMISSION_DENIED), the tenant's quotas
        (RESOURCE_EXHAUSTED with a retry-after; one call is one create for the rate)."""
        if claims is None:
            return
        live = await self.live_sessions(claims.tenant)
        more = f" and asks for {count} more" if count > 1 else ""
        if claims.max_sessions and live + count > claims.max_sessions:
            raise self._deny(
                "session limit",
                f"this token allows {claims.max_sessions} live sessions; tenant "
                f"{claims.tenant!r} has {live}{more}",
            )
        if self.quotas.max_sessions and live + count > self.quotas.max_sessions:
            self._metrics.quota_refusals.add(1, {"reason": "tenant_sessions"})
            raise ResourceExhausted(
                f"tenant {claims.tenant!r} has {live} live sessions{more}: its quota is "
                f"{self.quotas.max_sessions}",
                retry_after_s=5.0,
            )
        wait = self._creates.take(claims.tenant)
        if wait > 0:
            self._metrics.quota_refusals.add(1, {"reason": "create_rate"})
            raise ResourceExhausted(
                f"tenant {claims.tenant!r} creates sessions faster than "
                f"{self.quotas.creates_per_s:g} per second",
                retry_after_s=wait,
            )

    async def live_sessions(self, tenant: str) -> int:
        """The tenant's sessions that are not closed and not parked: its index, then their
        placements in one transaction (parked is what the placement says, so an unpark,
        whoever does it, counts at once)."""
        kvs = etcd.kv(self._etcd)
        prefix = names.tenant_sessions_prefix(tenant).encode()
        index = await kvs.get(prefix, prefix_range_end(prefix), keys_only=True)
        if not index.kvs:
            return 0
        ids = [item.key.decode()[len(prefix) :] for item in index.kvs]
        reads = await kvs.txn(
            compare=[], success=[kvs.txn_op_get(names.placement_key(i)) for i in ids]
        )
        live = 0
        for response in reads.responses:
            for item in response.response_range.kvs:
                if not internal_pb2.PlacementRecord.FromString(item.value).parked:
                    live += 1
        return live

    async def register(self, session: pb.Session) -> None:
        """Index a new session under its tenant (``names.tenant_session_key``; the session
        service removes it when the session closes)."""
        if session.tenant:
            await etcd.kv(self._etcd).put(
                names.tenant_session_key(session.tenant, session.session_id), b""
            )

    # ---- budgets ----

    async def budget(self, claims: Claims | None, fps: float) -> Budget | None:
        """What the caller's token may still stream at ``fps`` (None: no cap);
        RESOURCE_EXHAUSTED when it is spent."""
        if claims is None or claims.budget_s <= 0:
            return None
        used = await self.ledger.token_seconds(claims.jti)
        budget = Budget(claims.jti, claims.budget_s, used, fps)
        if budget.frames_left <= 0:
            self._metrics.quota_refusals.add(1, {"reason": "budget"})
            raise ResourceExhausted(
                f"the token's streaming budget is spent ({used:.1f} of {claims.budget_s:g} s); "
                "attach with a new token to go on"
            )
        return budget


class Budget:
    """One stream's share of its token's budget: the frames it may still deliver, and
    the warnings its frames cross (pure)."""

    def __init__(self, token_id: str, budget_s: float, used_s: float, fps: float) -> None:
        self.token_id = token_id
        self.budget_s = budget_s
        self.used_s = used_s
        self.fps = fps
        self.frames_left = math.floor((budget_s - used_s) * fps + 1e-6)
        self._warned = {w for w in WARN_AT if used_s >= w * budget_s}

    def delivered(self, frames: int) -> list[pb.SessionEvent]:
        """``frames`` more frames went out: the warnings they cross."""
        self.frames_left -= frames
        self.used_s += frames / self.fps
        events = []
        for mark in WARN_AT:
            if mark not in self._warned and self.used_s >= mark * self.budget_s:
                self._warned.add(mark)
                events.append(
                    pb.SessionEvent(
                        kind=pb.SessionEvent.KIND_BUDGET_WARNING,
                        message=(
                            f"{mark:.0%} of the token's streaming budget is used "
                            f"({self.used_s:.1f} of {self.budget_s:g} s)"
                        ),
                    )
                )
        return events

    def ledger_says(self, used_s: float) -> bool:
        """The ledger's figure for the token (its other streams included); True once the
        budget is spent by it."""
        self.used_s = max(self.used_s, used_s)
        return used_s >= self.budget_s


REASONS = (
    ("expired", "expired"),
    ("not valid for", "not yet valid"),
    ("revoked", "revoked key"),
    ("retired", "retired signing key"),
    ("unknown", "unknown signing key"),
    ("signature", "bad signature"),
    ("algorithm", "wrong algorithm"),
    ("claim", "bad claims"),
    ("malformed", "malformed"),
)


def _reason(message: str) -> str:
    """A refusal's reason for the counters (the messages carry details: ages, key ids)."""
    for needle, reason in REASONS:
        if needle in message:
            return reason
    return "missing or bad credential"
