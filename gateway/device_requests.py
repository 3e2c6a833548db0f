"""set and cmd requests from the sinks: read, rate-limited, carried out by the device's driver, answered, audited."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.outbox import Outbox
from gateway.audit import AuditRecord
from gateway.errors import SinkError
from gateway.jsonsafe import JsonRejected, dumps_safe, loads_strict
from gateway.token_bucket import TokenBucket
from gateway.types import Command, CommandResult, DeviceProfile, Message, RequestMeta, Write, WriteResult

# The logger name these lines had before the split (set/cmd requests were the router's):
# journal filters keep working.
log = logging.getLogger("gateway.router")

Audit = Callable[[AuditRecord], None]

#: A request's payload longer than this is refused unread (a `set` value or a `cmd` is a few bytes).
MAX_REQUEST_PAYLOAD = 64 * 1024
#: Requests a sink may bring per second that are refused before any device sees them (for an unknown device,
#: one that takes no writes/commands, or one over its own rate), and at once: each is audited and answered, so
#: without a bound a flood of them fills the audit log (and rotates the real records out of it).
STRAY_RATE = 10.0
STRAY_BURST = 20
#: A dropped request is logged at most this often per sink.
DROP_LOG_INTERVAL = 60.0
#: A request's age limit when its sink gives none (the default of a sink's `max_request_age`).
MAX_REQUEST_AGE = 30.0


def too_old(meta: RequestMeta) -> str | None:
    """Why a request is not to be carried out at all (older than its limit on arrival), or None."""
    if meta.age <= meta.max_age:
        return None
    limit = "its message expiry" if meta.expiry_given else "max_request_age"
    return f"too old: {meta.age:.1f} s old, {limit} is {meta.max_age:g} s; not carried out"


def deadline(meta: RequestMeta, started: float) -> float:
    """The time.monotonic() after which a request that arrived at `started` is refused rather than carried out."""
    return started + meta.max_age - meta.age


def _audit_record(
    outbox: Outbox,
    arrived_ns: int,
    topic: str,
    device: str,
    action: str,
    target: str | None,
    request: Any,
    request_id: str | None = None,
    raw: bytes | None = None,
) -> Callable[..., AuditRecord]:
    """The AuditRecord of one set/cmd request that came in on `outbox`'s sink, given its outcome's fields."""
    return functools.partial(
        AuditRecord,
        ts_ns=arrived_ns,
        origin=outbox.sink.name,
        topic=outbox.sink.topic(topic),
        device=device,
        action=action,
        target=target,
        request=request,
        request_id=request_id,
        raw=raw,
    )


class DeviceRequests:
    """Carries out `<device>/set/<point>` and `<device>/cmd` requests; each result goes back to the sink it came on."""

    def __init__(
        self,
        profile_of: Callable[[str], DeviceProfile | None],
        answer_to: Callable[[Outbox, Message], None],
        *,
        clock: Callable[[], float],
        audit: Audit | None = None,
    ) -> None:
        self._profile_of = profile_of
        self._answer_to = answer_to
        self._clock = clock
        self._audit = audit
        #: Per device with a write rate: its bucket of writes and commands.
        self._buckets: dict[str, TokenBucket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Per sink: one bucket for requests refused before any device sees them (see STRAY_RATE).
        self._stray: dict[str, TokenBucket] = {}
        #: Per sink: requests dropped by that bucket (neither carried out, audited nor answered).
        self.dropped: dict[str, int] = {}
        self._drop_logged: dict[str, float] = {}

    def set_rates(self, profiles: list[DeviceProfile]) -> None:
        """Take the devices' write rates; a device whose rate and burst stay keeps its bucket as it is."""
        old, self._buckets = self._buckets, {}
        for p in profiles:
            if p.write_rate is None:
                continue
            bucket = old.get(p.name)
            if bucket is None or (bucket.rate, bucket.burst) != (p.write_rate, p.write_burst):
                bucket = TokenBucket(p.write_rate, p.write_burst, self._clock())
            self._buckets[p.name] = bucket

    def on_request(self, outbox: Outbox, topic: str, payload: bytes, meta: RequestMeta | None = None) -> None:
        """Handle `<device>/set/<point>` and `<device>/cmd` from a sink; the result goes back to it (and, MQTT 5, to
        the request's response topic). One older than its age limit is refused and audited, never carried out."""
        meta = meta or RequestMeta(max_age=MAX_REQUEST_AGE)
        # At most three parts: a point name with "/" (a Sparkplug DCMD's folders; never an MQTT `+/set/+`) is
        # refused and audited as a point the device does not have, not dropped unseen.
        parts = topic.split("/", 2)
        if len(parts) == 3 and parts[1] == "set":
            self._spawn(self._set(outbox, parts[0], parts[2], payload, meta))
        elif len(parts) == 2 and parts[1] == "cmd":
            self._spawn(self._cmd(outbox, parts[0], payload, meta))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("handling a request failed: %r", exc, exc_info=exc)

    def admit_write(self, device: str) -> str | None:
        """A write to `device` from elsewhere (the Modbus TCP server): None and a token of the device's write rate
        spent, as an MQTT write spends one, or the refusal when it has none left."""
        return self._rate_limited(device, "writes")

    def _rate_limited(self, device: str, what: str) -> str | None:
        """The refusal when `device` has used up its write rate, else None (and a token is spent)."""
        bucket = self._buckets.get(device)
        if bucket is None or bucket.take(self._clock()):
            return None
        return f"rate limited: {device} takes at most {bucket.rate:g} {what}/s (burst {bucket.burst})"

    def _admit(self, outbox: Outbox, device: str, takes: bool, what: str) -> tuple[bool, str | None]:
        """Whether to handle a request at all, and its refusal when the device is over its rate.

        A request the device takes spends one of the device's tokens; one refused before reaching a device (no
        such device, none it takes, over the rate) spends one of the sink's as well, and is dropped without one.
        """
        refusal = self._rate_limited(device, what) if takes else None
        if (refusal or not takes) and not self._stray_ok(outbox):
            return False, refusal
        return True, refusal

    def _stray_ok(self, outbox: Outbox) -> bool:
        """Spend one of the sink's tokens for a request no device will see; False (counted) when there is none."""
        sink, now = outbox.sink.name, self._clock()
        bucket = self._stray.get(sink)
        if bucket is None:
            bucket = self._stray[sink] = TokenBucket(STRAY_RATE, STRAY_BURST, now)
        if bucket.take(now):
            return True
        dropped = self.dropped[sink] = self.dropped.get(sink, 0) + 1
        if now - self._drop_logged.get(sink, float("-inf")) >= DROP_LOG_INTERVAL:
            self._drop_logged[sink] = now
            log.warning(
                "sink %s: more than %g requests/s that no device takes; dropping the rest unanswered and unaudited "
                "(%d so far)",
                sink,
                STRAY_RATE,
                dropped,
            )
        return False

    def _answer(self, outbox: Outbox, topic: str, body: dict[str, Any], meta: RequestMeta) -> None:
        payload = dumps_safe(body)
        try:
            self._answer_to(outbox, Message(topic, payload))
        except SinkError as exc:  # the sink is going away (stop, reload): nobody is left to tell
            log.info("result on %s not sent: %s", topic, exc)
        if meta.respond is not None:
            try:
                meta.respond(payload)
            except Exception:  # the /result topic has it: a failed second copy costs only itself
                log.exception("answer on the response topic of %s failed", topic)

    def _record(self, record: AuditRecord) -> None:
        if self._audit is None:
            return
        try:
            self._audit(record)
        except Exception:
            # The action is carried out (or refused) as asked; losing its record is worth a traceback, not more.
            log.exception("audit record of %s %s could not be written", record.action, record.topic)

    @staticmethod
    def _read(payload: bytes) -> tuple[Any, str | None]:
        """The request's JSON and None, or None and why it is refused."""
        if len(payload) > MAX_REQUEST_PAYLOAD:
            return None, f"payload of {len(payload)} bytes; requests take at most {MAX_REQUEST_PAYLOAD}"
        try:
            return loads_strict(payload), None
        except JsonRejected as exc:
            return None, f"payload is not JSON: {str(exc)[:120]}: {payload[:64]!r}"

    async def _set(self, outbox: Outbox, device: str, point: str, payload: bytes, meta: RequestMeta) -> None:
        arrived, started = time.time_ns(), time.monotonic()
        profile = self._profile_of(device)
        writer = profile.writer if profile is not None else None
        go_on, refusal = self._admit(outbox, device, writer is not None, "writes")
        if not go_on:
            return
        result_topic = f"{device}/set/{point}/result"
        value, problem = self._read(payload)
        raw = payload if problem else None
        if isinstance(value, dict):
            value = value.get("value")
        record = _audit_record(outbox, arrived, f"{device}/set/{point}", device, "set", point, value, raw=raw)
        result = WriteResult(ok=False, error="the gateway stopped before the device answered")
        try:
            if problem:
                result = WriteResult(ok=False, error=problem)
            elif late := too_old(meta):
                result = WriteResult(ok=False, error=late)
            elif profile is None:
                result = WriteResult(ok=False, error=f"unknown device {device!r}")
            elif writer is None:
                result = WriteResult(ok=False, error=f"{device} takes no writes")
            elif refusal:
                result = WriteResult(ok=False, error=refusal)
            else:
                # Before the device is touched: a crash after this line still leaves a trace of the request.
                self._record(record(ok=None, stage="request"))
                # The line refuses it rather than write it late (a write may wait behind polls or a reopen).
                write = Write(device, point, value, origin=outbox.sink.name, deadline=deadline(meta, started))
                result = await writer(write)
        except Exception as exc:
            log.exception("set %s.%s failed", device, point)
            result = WriteResult(ok=False, error=f"the gateway failed to carry it out: {exc!r}"[:300])
        finally:
            log.info("set %s.%s = %r: %s", device, point, payload[:64], "ok" if result.ok else result.error)
            self._answer(outbox, result_topic, {"ok": result.ok, "value": result.value, "error": result.error}, meta)
            self._record(
                record(
                    ok=result.ok,
                    result=result.value,
                    error=result.error,
                    duration_ms=(time.monotonic() - started) * 1000,
                )
            )

    async def _cmd(self, outbox: Outbox, device: str, payload: bytes, meta: RequestMeta) -> None:
        arrived, started = time.time_ns(), time.monotonic()
        profile = self._profile_of(device)
        commander = profile.commander if profile is not None else None
        go_on, refusal = self._admit(outbox, device, commander is not None, "commands")
        if not go_on:
            return
        body, problem = self._read(payload)
        raw = payload if problem else None
        cmd_id: object = body.get("id") if isinstance(body, dict) else None
        request_id = None if cmd_id is None else cmd_id if isinstance(cmd_id, str) else dumps_safe(cmd_id).decode()
        name = body.get("name") if isinstance(body, dict) else None
        args = body.get("args", {}) if isinstance(body, dict) else body
        target = name if isinstance(name, str) else None
        record = _audit_record(outbox, arrived, f"{device}/cmd", device, "cmd", target, args, request_id, raw)
        result = CommandResult(ok=False, error="the gateway stopped before the device answered")
        try:
            if problem:
                result = CommandResult(ok=False, error=problem)
            elif late := too_old(meta):
                result = CommandResult(ok=False, error=late)
            elif not isinstance(body, dict) or not isinstance(name, str) or not name:
                result = CommandResult(ok=False, error='payload must be {"name": str, "args": {...}, "id": optional}')
            elif not isinstance(args, dict):
                result = CommandResult(ok=False, error="args must be a JSON object")
            elif profile is None:
                result = CommandResult(ok=False, error=f"unknown device {device!r}")
            elif commander is None:
                result = CommandResult(ok=False, error=f"{device} takes no commands")
            elif refusal:
                result = CommandResult(ok=False, error=refusal)
            else:
                self._record(record(ok=None, stage="request"))
                result = await commander(Command(device, name, args, request_id, deadline=deadline(meta, started)))
        except Exception as exc:
            log.exception("cmd %s failed", device)
            result = CommandResult(ok=False, error=f"the gateway failed to carry it out: {exc!r}"[:300])
        finally:
            log.info("cmd %s: %s", device, "ok" if result.ok else result.error)
            reply = {"id": cmd_id, "ok": result.ok, "result": result.result, "error": result.error}
            self._answer(outbox, f"{device}/cmd/result", reply, meta)
            self._record(
                record(
                    ok=result.ok,
                    result=result.result,
                    error=result.error,
                    duration_ms=(time.monotonic() - started) * 1000,
                )
            )

    async def stop(self) -> None:
        """Wait briefly for writes in progress."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
