"""`WorkloadApiIdentity`: the pod's SVIDs kept current from the SPIFFE Workload API (gRPC on a Unix socket).

Owns the X.509 stream (rotations, retries, health), the per-audience JWT-SVID cache and the listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from outrider.sidecar.identity import IdentityUnavailable, X509Material
from outrider.sidecar.identity import svid as core
from outrider.sidecar.identity import workload_messages as messages
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.grpc_unix import RpcError, UnixChannel
from outrider.sidecar.telemetry.observer import NullObserver, Observer

log = logging.getLogger("outrider.identity")

# Every Workload API call must carry this header (SPIFFE Workload Endpoint spec, "security header").
METADATA = (("workload.spiffe.io", "true"),)
_SERVICE = "/SpiffeWorkloadAPI/"

Listener = Callable[[X509Material], None]


@dataclass(frozen=True)
class _JwtEntry:
    token: str = field(repr=False)  # the bearer JWT-SVID: never in a repr
    refresh_at: float
    expires_at: float


@dataclass(frozen=True)
class IdentityStats:
    """A consistent read of the counters /metrics shows."""

    spiffe_id: str | None
    ready: bool
    state: str
    rotations: int
    bundle_updates: int
    stream_failures: int
    not_after: float | None
    jwt_fetches: dict[str, int]
    jwt_cached: int


class WorkloadApiIdentity:
    """Implements `outrider.sidecar.identity.WorkloadIdentity` over the Workload API.

    Readers get immutable `X509Material` snapshots: a rotation swaps one reference, so a request
    that already took a snapshot finishes with it and never sees half an update.
    """

    def __init__(
        self,
        config: IdentityConfig,
        *,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._observer: Observer = observer or NullObserver()
        self._clock = clock
        self._material: X509Material | None = None
        self._serial: int | None = None
        self._state = core.STARTING
        self._detail = f"waiting for the first X.509-SVID from {config.socket}"
        self._unhealthy_since: float | None = None
        self._rotations = 0
        self._bundle_updates = 0
        self._stream_failures = 0
        self._listeners: list[Listener] = []
        self._updated = asyncio.Event()
        self._jwt_cache: OrderedDict[str, _JwtEntry] = OrderedDict()
        self._jwt_inflight: dict[str, asyncio.Task[_JwtEntry]] = {}
        self._jwt_fetches: Counter[str] = Counter()
        self._channel: UnixChannel | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        # Connects on demand and again after a loss: the retry loop's backoff is the only one.
        self._channel = UnixChannel(self._config.socket_path)
        self._task = asyncio.create_task(self._x509_loop(), name="outrider-identity-x509")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._jwt_inflight.values()):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> WorkloadApiIdentity:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the WorkloadIdentity contract -------------------------------------------------------------

    @property
    def spiffe_id(self) -> str | None:
        material = self._material
        return material.spiffe_id if material else None

    @property
    def ready(self) -> bool:
        return self._readiness()[0]

    @property
    def status(self) -> str:
        return self._readiness()[1]

    def x509(self) -> X509Material:
        material = self._material
        if material is None or self._clock() >= material.not_after - self._config.expiry_margin_s:
            raise IdentityUnavailable(self.status)
        return material

    async def jwt_svid(self, audience: str) -> str:
        entry = self._jwt_cache.get(audience)
        if entry is not None and self._clock() < entry.refresh_at:
            self._jwt_cache.move_to_end(audience)
            self._jwt_fetches["cache_hit"] += 1
            return entry.token
        task = self._jwt_inflight.get(audience)
        if task is None:
            # Single flight: concurrent callers for one audience share one Workload API call.
            task = asyncio.create_task(self._fetch_jwt(audience), name=f"outrider-jwt-svid:{audience}")
            self._jwt_inflight[audience] = task
            task.add_done_callback(lambda t: self._jwt_done(audience, t))
        try:
            # shield: one caller giving up must not cancel the fetch the others wait for
            fresh = await asyncio.shield(task)
        except IdentityUnavailable:
            if entry is not None and self._clock() < entry.expires_at - self._config.expiry_margin_s:
                return entry.token  # the agent is briefly away; the cached SVID is still valid
            raise
        return fresh.token

    # -- extras for users that need more than the contract ------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(material)` on the event loop after every SVID or bundle update."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def next_update(self, current: X509Material | None) -> X509Material:
        """Wait until the held snapshot is not `current` (the first SVID, a rotation, new bundles)."""
        while True:
            material = self._material
            if material is not None and material is not current:
                return material
            await self._updated.wait()

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 (a convenience for CLIs)
        """True once ready (e.g. for CLIs and tests); False after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.ready:
                    await self.next_update(self._material)
        return self.ready

    async def jwt_bundles(self) -> dict[str, bytes]:
        """The JWT trust bundles (JWKS JSON by trust domain), read once from the Workload API."""
        call = self._require_channel().unary_stream(
            _SERVICE + "FetchJWTBundles",
            messages.EMPTY_REQUEST,
            METADATA,
            self._config.jwt_fetch_timeout_s,
        )
        try:
            async for raw in call:
                response = messages.decode_jwt_bundles_response(raw)
                return {core.trust_domain_of(k): v for k, v in response.bundles.items()}
        except RpcError as exc:
            raise IdentityUnavailable(self._classify(exc)[1]) from None
        except messages.MessageError as exc:
            raise IdentityUnavailable(
                f"the Workload API sent an unreadable JWT bundle answer: {exc}"
            ) from None
        finally:
            await call.aclose()  # type: ignore[attr-defined]
        raise IdentityUnavailable("the Workload API closed the JWT bundle stream without an answer")

    def stats(self) -> IdentityStats:
        ready, _ = self._readiness()
        material = self._material
        return IdentityStats(
            spiffe_id=material.spiffe_id if material else None,
            ready=ready,
            state=self._state,
            rotations=self._rotations,
            bundle_updates=self._bundle_updates,
            stream_failures=self._stream_failures,
            not_after=material.not_after if material else None,
            jwt_fetches=dict(self._jwt_fetches),
            jwt_cached=len(self._jwt_cache),
        )

    # -- internals ---------------------------------------------------------------------------------

    def _require_channel(self) -> UnixChannel:
        if self._channel is None:
            raise IdentityUnavailable("identity is not started")
        return self._channel

    def _readiness(self) -> tuple[bool, str]:
        now = self._clock()
        material = self._material
        if material is None:
            return False, f"{self._state}: {self._detail}"
        remaining = material.not_after - self._config.expiry_margin_s - now
        if remaining <= 0:
            return False, f"{self._state}: X.509-SVID for {material.spiffe_id} expired; {self._detail}"
        if self._state == core.OK:
            return True, "ok"
        outage = now - (self._unhealthy_since or now)
        if (
            self._state in (core.AGENT_UNAVAILABLE, core.SOCKET_MISSING)
            and outage < self._config.stale_grace_s
        ):
            return True, (
                f"degraded: {self._detail}; serving the cached SVID for {material.spiffe_id} "
                f"(valid {remaining:.0f} s more, unhealthy for {outage:.0f} s)"
            )
        return False, f"{self._state}: {self._detail}"

    def _set_state(self, state: str, detail: str) -> None:
        if state == self._state and detail == self._detail:
            return
        changed = state != self._state
        was_ok = self._state == core.OK
        self._state, self._detail = state, detail
        if not changed:
            log.debug("identity still %s: %s", state, detail)
            return
        if state == core.OK:
            self._unhealthy_since = None
            log.info("identity healthy: %s", detail)
            self._observer.identity_event("healthy", self.spiffe_id, detail)
        else:
            if was_ok or self._unhealthy_since is None:
                self._unhealthy_since = self._clock()
            log.warning("identity unhealthy (%s): %s", state, detail)
            self._observer.identity_event("unhealthy", self.spiffe_id, f"{state}: {detail}")

    def _classify(self, exc: RpcError | None, code_name: str = "", details: str = "") -> tuple[str, str]:
        if exc is not None:
            code_name, details = exc.code_name, exc.details
        path = self._config.socket_path
        return core.classify(code_name, details, socket_path=path, socket_exists=Path(path).exists())

    async def _x509_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async for raw in self._require_channel().unary_stream(
                    _SERVICE + "FetchX509SVID", messages.EMPTY_REQUEST, METADATA
                ):
                    self._accept(messages.decode_x509_svid_response(raw))
                    attempt = 0
                state, detail = self._classify(None, "STREAM_ENDED", "the agent closed the stream")
            except asyncio.CancelledError:
                raise
            except RpcError as exc:
                state, detail = self._classify(exc)
            except (core.SvidFormatError, messages.MessageError) as exc:
                state, detail = core.BAD_RESPONSE, f"the Workload API sent an unusable X.509-SVID: {exc}"
            except Exception as exc:  # never let the identity task die: log (once) and retry
                state, detail = core.ERROR, f"unexpected {type(exc).__name__} (see the log)"
                if (state, detail) != (self._state, self._detail):
                    log.exception("unexpected error in the Workload API stream")
            self._stream_failures += 1
            self._set_state(state, detail)
            await asyncio.sleep(
                core.backoff_delay(attempt, self._config.backoff_min_s, self._config.backoff_max_s)
            )
            attempt += 1

    def _accept(self, response: messages.X509SvidResponse) -> None:
        if not response.svids:
            raise core.SvidFormatError("the response holds no SVID")
        first = response.svids[0]  # the default SVID (SPIFFE Workload API: first is the default)
        material = core.material_from_response(
            first.spiffe_id,
            first.x509_svid,
            first.x509_svid_key,
            first.bundle,
            response.federated_bundles,
        )
        serial = core.leaf_serial(material)
        previous = self._material
        self._material = material  # the atomic swap every reader relies on
        if previous is not None and previous.spiffe_id != material.spiffe_id:
            # the registration changed: cached JWT-SVIDs name the old identity
            self._jwt_cache.clear()
            log.warning("SPIFFE ID changed from %s to %s", previous.spiffe_id, material.spiffe_id)
        if previous is None or serial != self._serial:
            self._rotations += 1
            remaining = material.not_after - self._clock()
            detail = f"X.509-SVID {material.spiffe_id} serial {serial:x}, valid {remaining:.0f} s"
            log.info("new %s", detail)
            self._observer.identity_event("rotated", material.spiffe_id, detail)
        else:
            self._bundle_updates += 1
            log.info(
                "trust bundle update for %s (trust domains %s)",
                material.spiffe_id,
                sorted(material.bundles_pem),
            )
        self._serial = serial
        self._set_state(core.OK, f"X.509-SVID for {material.spiffe_id} held, stream healthy")
        for listener in list(self._listeners):
            try:
                listener(material)
            except Exception:
                log.exception("identity rotation listener failed")
        event, self._updated = self._updated, asyncio.Event()
        event.set()

    async def _fetch_jwt(self, audience: str) -> _JwtEntry:
        channel = self._require_channel()
        try:
            raw = await channel.unary_unary(
                _SERVICE + "FetchJWTSVID",
                messages.encode_jwt_svid_request([audience]),
                METADATA,
                self._config.jwt_fetch_timeout_s,
            )
            response = messages.decode_jwt_svid_response(raw)
        except RpcError as exc:
            state, detail = self._classify(exc)
            self._jwt_fetches[state] += 1
            raise IdentityUnavailable(f"no JWT-SVID for audience {audience!r}: {detail}") from None
        except messages.MessageError as exc:
            self._jwt_fetches["bad_response"] += 1
            raise IdentityUnavailable(
                f"unreadable JWT-SVID answer for audience {audience!r}: {exc}"
            ) from None
        if not response.svids:
            self._jwt_fetches["empty"] += 1
            raise IdentityUnavailable(f"the Workload API returned no JWT-SVID for audience {audience!r}")
        token = response.svids[0].svid
        now = self._clock()
        try:
            times = core.jwt_times(token, now=now)
        except core.SvidFormatError as exc:
            self._jwt_fetches["bad_response"] += 1
            raise IdentityUnavailable(str(exc)) from None
        entry = _JwtEntry(
            token=token,
            refresh_at=min(core.jwt_refresh_at(times, self._config.jwt_refresh_fraction), times.expires_at),
            expires_at=times.expires_at,
        )
        self._jwt_cache[audience] = entry
        self._jwt_cache.move_to_end(audience)
        while len(self._jwt_cache) > self._config.jwt_cache_size:
            self._jwt_cache.popitem(last=False)
        self._jwt_fetches["fetched"] += 1
        return entry

    def _jwt_done(self, audience: str, task: asyncio.Task[_JwtEntry]) -> None:
        if self._jwt_inflight.get(audience) is task:
            del self._jwt_inflight[audience]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have given up already
