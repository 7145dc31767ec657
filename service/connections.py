"""Connection guards: read deadlines, a connection cap, and quiet logs at the fd limit, on every start-up path.

``anydoor serve`` hands :func:`protocol_class` to uvicorn itself. Under ``uvicorn service.app:create_app
--factory`` (or any other uvicorn start of the app), :class:`ConnectionGuards`, an ASGI middleware that
:func:`service.app.create_app` installs, puts the same protocol into uvicorn's config during the lifespan startup,
before uvicorn opens its listener (see :func:`install_under_uvicorn`); where it cannot (another server, a custom
``--http`` class, ``--lifespan off``), it logs a warning that the guards are off.

uvicorn bounds only the idle time of a kept-alive connection. A client that connects and sends nothing, sends its
request head a byte at a time, or trickles its body, holds a socket (and, for ``/predict``, an upload slot) for as
long as it likes; enough of them exhaust the open-files limit, and then every accept fails with a traceback and
``/health/live`` stops answering. :class:`GuardedH11Protocol`, uvicorn's h11 protocol with timers added, closes
such connections:

* **head deadline** (``ANYDOOR_HEADER_TIMEOUT_S``): the request line and headers must be complete within this time
  of the accept, or of the first byte of a next request on a kept-alive connection (idle between requests is
  uvicorn's keep-alive timeout). h11 already caps the head's size.
* **body deadline** (``ANYDOOR_BODY_TIMEOUT_S``) for the whole body, and an **idle gap** (``ANYDOOR_IDLE_TIMEOUT_S``)
  between its chunks. A total deadline alone lets a stalled client sit for the whole of it; a gap alone (or a
  minimum rate) lets a steady trickle go on for hours. Time when the server, not the client, stopped reading
  (uvicorn pauses reading while the app has not taken what is buffered) is not held against the client.
* **response stall**: a response that the client does not read for the idle gap is abandoned (slow read).
* **connection cap** (``ANYDOOR_MAX_CONNECTIONS``): at the cap, a new connection first evicts the one that has
  waited longest (at least ``EVICT_AFTER_S``) for its request head, taking its slot: a real client sends its head
  within milliseconds of the accept, so the longest waiter is almost surely a slow-loris, and idle connections
  cannot keep newcomers (probes among them) out. Failing that, a reserve of one eighth more (at least 8) serves
  the health and metrics routes only, with a short head deadline, so probes get through while the ordinary slots
  are busy with uploads and generations. Past the reserve, a "fast lane" of ``FAST_LANE`` more serves the same
  routes to connections that send their request at once (as probes do, and slow clients do not), so probes get
  through even when slow clients reconnect as fast as they are closed; connections past that are dropped. The
  soft open-files limit is raised to the hard one at start; where the cap still does not fit, it is lowered so
  that it, the reserve and ``FD_HEADROOM`` descriptors for everything else (the fast lane's among them) fit, and
  the listen backlog is cut to what is left (see :func:`fit_to_fd_limit`): the server then refuses connections
  itself, cheaply, instead of failing accepts.

Should descriptors run out anyway (something else using them), asyncio's accept loop stops listening for a second
at a time by itself; :func:`install_log_filters` turns its traceback per failed accept into one warning per
``LOG_INTERVAL_S`` with a count. Connection events are logged the same way, never a line per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from model.errors import ErrorCode
from service.errors import ServiceError, error_response
from service.settings import Settings

log = logging.getLogger("anydoor.service.connections")

LOG_INTERVAL_S = 10.0
# Descriptors kept out of the connection cap: the fast lane's, OTHER_FDS for everything but client sockets
# (listener, epoll, logs, weights, downloads, torch), and at least MIN_BACKLOG for one accept() round.
FD_HEADROOM = 64
OTHER_FDS = 16
MIN_BACKLOG = 16
ACCEPT_BACKLOG = 2048  # uvicorn's default listen backlog
FD_LIMIT_TARGET = 1 << 20  # the soft open-files limit asked for at start (the hard limit, if lower)
MIN_RESERVE = 8
RESERVE_HEADER_TIMEOUT_S = 0.5  # a probe sends its whole request at once; reserve slots must turn over fast
# Past the reserve, up to this many more (out of FD_HEADROOM) get the reserve's routes with a head deadline that
# only a request sent right after connecting meets: an orchestrator's probe does, and then gets its answer even
# while slow clients hold every slot; a slow client is gone again after FAST_LANE_HEADER_TIMEOUT_S.
FAST_LANE = 16
FAST_LANE_HEADER_TIMEOUT_S = 0.1
EVICT_AFTER_S = 0.25  # real clients send their request head within milliseconds of being accepted
# Routes a reserve connection may use: cheap, and what orchestrators and monitoring need while the server is full.
RESERVE_PATHS = frozenset({"/health/live", "/health/ready", "/health-check", "/metrics"})
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The service's JSON error body (code request_timeout), written straight to the socket before the close.
_TIMEOUT_BODY = (b'{"error":"request_timeout","field":null,"message":"the request head or body did not arrive in time",'
                 b'"request_id":null}')
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(_TIMEOUT_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _TIMEOUT_BODY)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    max_connections: int  # connections served normally
    reserve: int  # more, for the health and metrics routes only
    backlog: int = ACCEPT_BACKLOG  # the listen queue, and the most connections one accept() round takes

    @property
    def hard_cap(self) -> int:
        return self.max_connections + self.reserve


def fit_to_fd_limit(max_connections: int, soft_limit: int, fds_open: int) -> tuple[int, int, int]:
    """(cap, reserve, backlog) for ``max_connections`` under an open-files limit with ``fds_open`` already used.

    asyncio's accept loop takes every queued connection in one round (up to the listen backlog) before any is
    looked at, so a burst of connections over the cap holds a descriptor each until they are all dropped; when
    the descriptors run out in the middle, accept() fails and the listener sleeps for a second. The backlog is
    therefore cut to what is left after the connections, the fast lane and OTHER_FDS: a longer burst waits in the
    kernel (SYN retries) rather than starve the process. Under the limit most systems give (after
    :func:`raise_fd_limit`) nothing changes.
    """
    reserve = max(MIN_RESERVE, max_connections // 8)
    cap = max_connections
    budget = soft_limit - fds_open - FD_HEADROOM
    if cap + reserve > budget:
        reserve = max(1, budget // 9)  # the same proportion as above
        cap = max(1, budget - reserve)
    spare = soft_limit - fds_open - cap - reserve - FAST_LANE - OTHER_FDS
    return cap, reserve, min(ACCEPT_BACKLOG, max(MIN_BACKLOG, spare))


def _fds_open() -> int:
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return 16


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one, as Go programs do at start: the soft limit is often left at
    1024 (systemd, some container hosts) under a far higher hard limit. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, FD_LIMIT_TARGET) if hard != resource.RLIM_INFINITY else FD_LIMIT_TARGET
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft
        log.info("raised the open-files limit (RLIMIT_NOFILE) from %d to %d", soft, target)
        return target
    return soft


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits for ``settings``: the open-files limit raised if it can be, the cap lowered (with a warning)
    where it still does not fit under it."""
    cap, reserve, backlog = settings.max_connections, max(MIN_RESERVE, settings.max_connections // 8), ACCEPT_BACKLOG
    soft = raise_fd_limit()
    if soft != resource.RLIM_INFINITY:
        cap, reserve, backlog = fit_to_fd_limit(settings.max_connections, soft, _fds_open())
        if cap < settings.max_connections:
            log.warning("the open-files limit (RLIMIT_NOFILE) is %d: at most %d connections (+%d for health checks) "
                        "instead of ANYDOOR_MAX_CONNECTIONS=%d, keeping %d descriptors for everything else, and a "
                        "listen backlog of %d; raise the limit (ulimit -n) to allow more", soft, cap, reserve,
                        settings.max_connections, FD_HEADROOM, backlog)
    limits = ConnectionLimits(settings.header_timeout_s, settings.body_timeout_s, settings.idle_timeout_s, cap,
                              reserve, backlog)
    log.info("connections: at most %d (+%d for health checks); deadlines: head %g s, body %g s, idle %g s; "
             "keep-alive %d s", cap, reserve, limits.header_timeout_s, limits.body_timeout_s, limits.idle_timeout_s,
             settings.keep_alive_s)
    return limits


# --- rate-limited logging -------------------------------------------------------------------------------------


class _Tally:
    """Counts events by kind and logs them at most once per interval: the first at once, later ones summed up at
    the end of their interval (a timer on the running loop, when there is one; else with the next event)."""

    def __init__(self, render: Callable[[Counter[str]], tuple[int, str]], interval_s: float = LOG_INTERVAL_S):
        self._render = render
        self._interval_s = interval_s
        self._counts: Counter[str] = Counter()
        self._next_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, kind: str) -> None:
        self._counts[kind] += 1
        now = time.monotonic()
        if now >= self._next_at:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self._next_at - now, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._counts:
            return
        counts, self._counts = self._counts, Counter()
        self._next_at = time.monotonic() + self._interval_s
        level, message = self._render(counts)
        log.log(level, message)


_CONNECTION_EVENTS = {
    "header": "closed at the head deadline",
    "body": "closed at the body deadline",
    "idle": "closed idle mid-body",
    "unread": "closed with their response unread",
    "evicted": "closed at the cap to make room, still waiting for their request head",
    "over_cap": "answered 429 over the connection cap",
    "refused": "refused past the connection cap and its reserve",
}


def _render_connection_events(counts: Counter[str]) -> tuple[int, str]:
    parts = [f"{counts[kind]} {text}" for kind, text in _CONNECTION_EVENTS.items() if counts[kind]]
    level = logging.WARNING if counts["refused"] or counts["over_cap"] else logging.INFO
    return level, f"slow or excess connections (at most one line per {LOG_INTERVAL_S:.0f} s): {', '.join(parts)}"


def _render_fd_errors(counts: Counter[str]) -> tuple[int, str]:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    what = ", ".join(f"{name} x{n}" for name, n in counts.items())
    # asyncio's accept loop goes on calling accept() for the rest of its round after the first failure, so the
    # count is of failed calls, not of connections.
    return logging.WARNING, (f"accept() failed: out of file descriptors ({what}; open-files limit {soft}); "
                             f"asyncio retries every second (at most one line per {LOG_INTERVAL_S:.0f} s)")


connection_events = _Tally(_render_connection_events)
fd_errors = _Tally(_render_fd_errors)


class _OutOfDescriptorsFilter(logging.Filter):
    """On the ``asyncio`` logger: an error whose exception is EMFILE/ENFILE (asyncio's ``socket.accept() out of
    system resource``, logged with a traceback for every accept() of the round that fails) becomes a count in
    :data:`fd_errors`; so do the tracebacks of the retries that each failure schedules, when they find the
    listener closed (a shutdown within a second of running out: ``Invalid file descriptor: -1``, once per failed
    accept). Everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_FDS:
            fd_errors.note(errno.errorcode.get(exc.errno, str(exc.errno)))
            return False
        if isinstance(exc, ValueError) and "_start_serving" in str(record.msg):
            fd_errors.note("retry on a closed listener")
            return False
        return True


def install_log_filters() -> None:
    """Collapse asyncio's out-of-descriptors tracebacks (idempotent)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OutOfDescriptorsFilter) for f in logger.filters):
        logger.addFilter(_OutOfDescriptorsFilter())


# --- the reserve: health and metrics only ---------------------------------------------------------------------


def _reserve_app(app: ASGIApp) -> ASGIApp:
    """``app`` for the reserve connections: the health and metrics routes, each answer closing the connection so
    the slot frees at once; any other request gets 429 ``overloaded`` without reaching the app."""

    async def reserve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in RESERVE_PATHS:
            async def send_and_close(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                await send(message)

            await app(scope, receive, send_and_close)
            return
        connection_events.note("over_cap")
        response = error_response(ServiceError(ErrorCode.OVERLOADED, "too many open connections; retry later",
                                               headers={"Retry-After": "1"}), None, None)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    return reserve


# --- the protocol ---------------------------------------------------------------------------------------------


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and the cap of the module docstring.

    It follows the request from h11's view of the client (``conn.their_state``) after each read, so it needs no
    change to uvicorn's event handling: IDLE is the head phase, SEND_BODY the body phase, anything else the app's
    turn (no read timer; the response stall timer and uvicorn's keep-alive apply).
    """

    # Set on the subclass that protocol_class() makes: the limits, and the connections waiting for a request head
    # with the loop time they began waiting, oldest first (a dict keeps insertion order; waiting anew re-inserts).
    limits: ClassVar[ConnectionLimits]
    waiting_heads: ClassVar[dict[GuardedH11Protocol, float]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = "head"  # "head", "body" or "app"
        self._deadline: asyncio.TimerHandle | None = None  # the head's or the body's
        self._idle: asyncio.TimerHandle | None = None  # the gap between body chunks
        self._stall: asyncio.TimerHandle | None = None  # a response waiting for the client to read
        self._head_bytes = 0
        self._last_read = 0.0
        self._refused = False
        self._reserve = False  # served the reserve's routes only

    # --- uvicorn's hooks ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        open_now = len(self.connections)
        head_timeout = self.limits.header_timeout_s
        if open_now >= self.limits.max_connections:
            victim = self._oldest_waiting()
            if victim is not None:
                self._reserve = victim._reserve  # its slot, normal or reserve
                victim._expire("evicted")
            elif open_now >= self.limits.hard_cap + FAST_LANE:
                # Before anything is set up: no h11 work, no entry in the server's connections. abort() drops the
                # socket now (a reset if a request is already there), the cheapest answer there is.
                self._refused = True
                transport.abort()
                connection_events.note("refused")
                return
            else:
                self._reserve = True
                if open_now >= self.limits.hard_cap:
                    head_timeout = FAST_LANE_HEADER_TIMEOUT_S
        super().connection_made(transport)
        if self._reserve:
            self.app = _reserve_app(self.app)
        self._start_head(min(head_timeout, RESERVE_HEADER_TIMEOUT_S) if self._reserve else head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_read_timers()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self._phase != "head" and self.conn.their_state is h11.IDLE:
            self._start_head(self.limits.header_timeout_s)  # the first bytes of a next request
        if self._phase == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        self._follow(read=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn may have parsed a pipelined request from buffered bytes here, without a read.
        self._follow(read=bool(self.conn.trailing_data[0]))

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.idle_timeout_s, self._on_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    # --- phases ---

    def _oldest_waiting(self) -> GuardedH11Protocol | None:
        for victim, since in self.waiting_heads.items():
            return victim if self.loop.time() - since >= EVICT_AFTER_S else None  # the oldest, or none old enough
        return None

    def _follow(self, *, read: bool) -> None:
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            # A request ended in this read (its answer was already sent: the client had more body to send), or
            # buffered bytes began the next one: uvicorn arms no keep-alive timer in either case.
            if self._phase != "head" and read:
                self._start_head(self.limits.header_timeout_s)
                self._head_bytes = len(self.conn.trailing_data[0])
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._cancel_read_timers()
                self._phase = "body"
                self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._on_body_deadline)
                self._idle = self.loop.call_later(self.limits.idle_timeout_s, self._on_idle_check)
        elif self._phase != "app":
            self._cancel_read_timers()
            self._phase = "app"

    def _start_head(self, timeout_s: float) -> None:
        self._cancel_read_timers()
        self._phase = "head"
        self._head_bytes = 0
        self._deadline = self.loop.call_later(timeout_s, self._expire, "header")
        self.waiting_heads[self] = self.loop.time()

    def _cancel_read_timers(self) -> None:
        for timer in (self._deadline, self._idle):
            if timer is not None:
                timer.cancel()
        self._deadline = self._idle = None
        self.waiting_heads.pop(self, None)

    # --- timers ---

    def _on_idle_check(self) -> None:
        # One timer per gap, moved on lazily, rather than one re-armed per chunk of an 80 MiB body.
        now = self.loop.time()
        if self.flow.read_paused:
            self._last_read = now  # we stopped reading, not the client
        quiet = now - self._last_read
        if quiet >= self.limits.idle_timeout_s:
            self._expire("idle")
        else:
            self._idle = self.loop.call_later(self.limits.idle_timeout_s - quiet, self._on_idle_check)

    def _on_body_deadline(self) -> None:
        if self.flow.read_paused:
            # The app has not taken the body buffered so far: not the client's fault; look again shortly.
            self._deadline = self.loop.call_later(1.0, self._on_body_deadline)
            return
        self._expire("body")

    def _expire(self, kind: str) -> None:
        self._cancel_read_timers()
        if self.transport.is_closing():
            return
        connection_events.note(kind)
        cycle = self.cycle if self._phase == "body" else None
        if cycle is not None and not cycle.response_complete:
            # Tell the app now, as connection_lost will: its receive() returns http.disconnect and nothing more
            # it sends reaches the socket (which would mix with the 408).
            cycle.disconnected = True
            cycle.message_event.set()
        answer = self._head_bytes > 0 if self._phase == "head" else cycle is not None and not cycle.response_started
        if answer:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()

    def _on_stall(self) -> None:
        self._stall = None
        if not self.transport.is_closing() or self.flow.write_paused:
            connection_events.note("unread")
            self.transport.abort()  # close() would wait for the unread response to drain


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: uvicorn makes one per connection."""
    namespace = {"limits": limits, "waiting_heads": {}}
    return cast(type[GuardedH11Protocol], type("GuardedH11Protocol", (GuardedH11Protocol,), namespace))


# --- installed by the app itself (plain uvicorn) --------------------------------------------------------------


def _uvicorn_config(receive: Receive) -> Any | None:
    """uvicorn's ``Config`` behind a lifespan ``receive``, or None.

    uvicorn's ``receive`` is a bound method of its ``LifespanOn``, which holds the config; frameworks may wrap it
    (FastAPI does) in closures, which are looked through. Failing that, the coroutine frames that called the
    lifespan are searched for the ``LifespanOn`` running it."""
    try:
        from uvicorn.config import Config
    except ImportError:  # pragma: no cover - uvicorn is a dependency
        return None

    def through(obj: Any, depth: int) -> Any | None:
        config = getattr(getattr(obj, "__self__", None), "config", None)
        if isinstance(config, Config):
            return config
        if depth > 0:
            for cell in getattr(obj, "__closure__", None) or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    found = through(cell.cell_contents, depth - 1)
                    if found is not None:
                        return found
        return None

    found = through(receive, 4)
    if found is not None:
        return found
    frame = sys._getframe(1)
    while frame is not None:
        config = getattr(frame.f_locals.get("self"), "config", None)
        if isinstance(config, Config):
            return config
        frame = frame.f_back  # type: ignore[assignment]
    return None


def install_under_uvicorn(receive: Receive, settings: Settings) -> str:
    """Put the guarded protocol into the uvicorn server whose lifespan ``receive`` is, before it listens.

    uvicorn runs the lifespan startup first and then creates its listener, whose protocol factory reads
    ``config.http_protocol_class`` (and the listen backlog) then, so replacing them here guards every connection.
    Returns what was done: ``"installed"``, ``"present"`` (``anydoor serve`` already did it) or why it could not.
    """
    config = _uvicorn_config(receive)
    if config is None:
        return "not running under uvicorn"
    current = getattr(config, "http_protocol_class", None)
    if isinstance(current, type) and issubclass(current, GuardedH11Protocol):
        return "present"
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    stock = {H11Protocol, AutoHTTPProtocol}
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        stock.add(HttpToolsProtocol)
    except ImportError:
        pass
    if current not in stock or getattr(config, "http2", False) or getattr(config, "is_ssl", False):
        return f"uvicorn runs the HTTP protocol {getattr(current, '__name__', current)!r}, not one of its own"
    limits = connection_limits(settings)
    config.http_protocol_class = protocol_class(limits)
    config.ws_protocol_class = None  # no WebSocket routes, so no upgrades (as anydoor serve)
    config.backlog = min(config.backlog, limits.backlog)
    config.timeout_keep_alive = settings.keep_alive_s
    install_log_filters()
    return "installed"


class ConnectionGuards:
    """ASGI middleware: on the lifespan startup, :func:`install_under_uvicorn`; a warning where it cannot."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.state: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.state is None:
            self.state = install_under_uvicorn(receive, self.settings)
            if self.state == "installed":
                log.info("connection guards installed into uvicorn (head, body and idle deadlines, the connection "
                         "cap, the unread-response timer)")
            elif self.state != "present":
                log.warning("connection guards are OFF: %s. Slow clients are bounded only by the minimum body rate "
                            "(ANYDOOR_MIN_BODY_RATE); start with `anydoor serve` or `uvicorn service.app:create_app "
                            "--factory` for the head, body and idle deadlines, the connection cap and the "
                            "unread-response timer", self.state)
        await self.app(scope, receive, send)
