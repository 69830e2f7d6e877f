"""What a node knows about organisations: revocations it honours, credentials it presents.

A provider that serves models under organisation policies keeps the newest revocation list
of each of those organisations. It looks each one up in the DHT every
``Config.revocation_refresh`` seconds (default: the republish interval), so a revocation
published anywhere is honoured within one interval, for new sessions and for grants already
issued. A list it learns it also stores back into the DHT, which republishes it: the list
stays alive as long as one provider of the organisation is up. A list never shrinks by
absence: a lookup that finds nothing, or an older seq, changes nothing.

A member checks the other side too: a provider found under an organisation's private keys
counts only with a valid, unrevoked certificate of that organisation inside its sealed
record. So members look up the lists of their own organisations as well: in the same
periodic refresh, and before trusting private records when the last lookup is older than
one interval (a short-lived CLI node thus knows the lists before its first ``find``).

A client presents to a provider the certificates of the organisations under which it found
that provider privately; when it doesn't know (the provider was found publicly or named
directly) it presents all of its valid certificates, at most ``session.MAX_CREDENTIALS``.
So a provider a member opens a session with may learn which organisations it belongs to.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Sequence

import trio

from modelnet.errors import ModelNetError
from modelnet.identity import IdentityError, Membership, PeerID, Revocation, open_revocation, revocation_key
from modelnet.protocols.session import MAX_CREDENTIALS

from .errors import P2PError

logger = logging.getLogger(__name__)


class PolicyError(P2PError):
    """An access policy a node cannot apply (e.g. for a model it does not serve)."""


class Revocations:
    """The newest known revocation list of each organisation (a newer seq wins)."""

    def __init__(self, known: Iterable[Revocation] = ()) -> None:
        self.lists: dict[PeerID, Revocation] = {}
        self.checked: dict[PeerID, float] = {}  # org -> when (trio time) its last lookup ended
        self._looking_up: dict[PeerID, trio.Event] = {}
        for revocation in known:
            self.learn(revocation)

    def stale(self, orgs: Iterable[PeerID], max_age: float) -> list[PeerID]:
        """Those of ``orgs`` whose list was not looked up within ``max_age`` seconds."""
        now = trio.current_time()
        return [org for org in dict.fromkeys(orgs) if self.checked.get(org, -math.inf) + max_age <= now]

    def is_revoked(self, org: PeerID, member: PeerID) -> bool:
        revocation = self.lists.get(org)
        return revocation is not None and member in revocation.revoked

    def learn(self, revocation: Revocation) -> bool:
        """Keep ``revocation`` if it is newer than what we hold; True if it was."""
        held = self.lists.get(revocation.org)
        if held is not None and (held.seq, held.expires) >= (revocation.seq, revocation.expires):
            return False
        self.lists[revocation.org] = revocation
        logger.info("revocation %d of %s: %d member(s) revoked", revocation.seq, revocation.org.short(), len(revocation.revoked))
        return True

    async def refresh(self, dht, orgs: Iterable[PeerID], *, now: float) -> int:
        """Look up the revocation list of each of ``orgs`` (concurrently); returns how many
        newer lists were learned. A lookup that fails is logged and changes nothing. An
        org already being looked up is not looked up twice: we wait for that lookup."""
        learned = 0

        async def one(org: PeerID) -> None:
            nonlocal learned
            pending = self._looking_up.get(org)
            if pending is not None:
                await pending.wait()
                return
            self._looking_up[org] = done = trio.Event()
            try:
                learned += await self._look_up(dht, org, now=now)
            finally:  # a failed lookup counts too: the periodic refresh retries, callers don't spin
                self.checked[org] = trio.current_time()
                del self._looking_up[org]
                done.set()

        async with trio.open_nursery() as nursery:
            for org in set(orgs):
                nursery.start_soon(one, org)
        return learned

    async def _look_up(self, dht, org: PeerID, *, now: float) -> int:
        """1 if a newer list of ``org`` was found (and stored back), else 0."""
        key = revocation_key(org)
        try:
            value = await dht.get_value(key)
        except ModelNetError as exc:
            logger.info("looking up the revocations of %s failed: %s", org.short(), exc)
            return 0
        if value is None:
            return 0
        try:
            revocation = open_revocation(value, now=now, org=org)
        except IdentityError as exc:  # the DHT validated it; a stale or odd value is only logged
            logger.info("dropping a revocation list of %s: %s", org.short(), exc)
            return 0
        if not self.learn(revocation):
            return 0
        try:
            await dht.put_value(key, value)  # keep it alive in the DHT
        except ModelNetError as exc:
            logger.info("storing the revocations of %s failed: %s", org.short(), exc)
        return 1

    async def serve_refresh(
        self,
        dht,
        orgs: Sequence[PeerID],
        *,
        interval: float,
        wall_clock: Callable[[], float],
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Refresh the lists of ``orgs`` now and then every ``interval`` seconds, forever."""
        task_status.started()
        while True:
            try:
                await self.refresh(dht, orgs, now=wall_clock())
            except Exception:  # top of a task: a failed round is retried next interval
                logger.exception("refreshing revocations failed")
            await trio.sleep(interval)


def credentials_for(
    memberships: Sequence[Membership], orgs: Iterable[PeerID] | None, *, now: float
) -> tuple[bytes, ...]:
    """Certificates to present: those of ``orgs`` (all valid ones if None), newest expiry first."""
    wanted = None if orgs is None else set(orgs)
    usable = [
        m.certificate
        for m in memberships
        if m.certificate.expires > now and (wanted is None or m.org in wanted)
    ]
    usable.sort(key=lambda c: c.expires, reverse=True)
    return tuple(c.encode() for c in usable[:MAX_CREDENTIALS])
