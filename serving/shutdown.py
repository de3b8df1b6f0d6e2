"""Graceful shutdown of a server worker: refuse new connections at once, drain the open ones, then exit."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import threading

log = logging.getLogger("tailwise.service")


def listening_fd(argv: list[str] | None = None) -> int | None:
    """The listening socket's descriptor that bentoml's worker was started with (`--fd N`), if any."""
    args = sys.argv if argv is None else argv
    for i, arg in enumerate(args[:-1]):
        if arg == "--fd" and args[i + 1].isdigit():
            return int(args[i + 1])
    return None


def uvicorn_protocol(server):
    """(protocol factory, TLS context) of a uvicorn server, built as its startup builds them (with asyncio's loop or
    uvloop alike); None when `server` is not uvicorn's (then the backlog is not taken over)."""
    try:
        config = server.config
        factory = functools.partial(config.http_protocol_class, config=config, server_state=server.server_state,
                                    app_state=server.lifespan.state)
        return factory, config.ssl
    except AttributeError:
        return None


class Drain:
    """On SIGTERM/SIGINT, first take the connections already waiting in the listening socket's backlog (their
    clients may have sent a request: they are served like any other, and the drain waits until uvicorn has them),
    then shut the listening socket down at once (new connections are refused, instead of waiting in the backlog of
    the socket bentoml's arbiter still holds and being reset later; a listening socket's shutdown resets what is
    left in its backlog) and stop polling it, then drain:
    `draining` is True, so the middleware answers every request with `Connection: close` (clients leave their
    keep-alive connections after a response, never while sending), until no request has started for `quiet_s`
    (at most `max_s`); then uvicorn's own handler runs, which lets in-flight requests finish
    (--timeout-graceful-shutdown) and exits."""

    def __init__(self, quiet_s: float = 0.5, max_s: float = 5.0):
        self.quiet_s, self.max_s = quiet_s, max_s
        self.draining = False
        self.last_request = 0.0
        self.taken_over: set[asyncio.Task] = set()   # the backlog's connections, handed to uvicorn

    def seen_request(self) -> None:
        if self.draining:
            self.last_request = asyncio.get_running_loop().time()

    def install(self) -> None:
        """In the worker, once uvicorn has installed its signal handlers (a bentoml on_startup hook)."""
        fd = listening_fd()
        if fd is None or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if callable(previous):
                signal.signal(signum, self.handler(loop, fd, previous))

    def serve_accepted(self, loop, protocol, connection: socket.socket) -> None:
        """Hand a connection accepted outside the event loop to uvicorn, as its own accept would have."""
        factory, ssl = protocol

        async def serve():
            try:
                await loop.connect_accepted_socket(factory, connection, ssl=ssl)
                self.last_request = loop.time()  # its request gets a quiet period of its own to arrive
            except OSError:  # the client left before it was served, or its TLS handshake failed
                connection.close()

        task = loop.create_task(serve())
        self.taken_over.add(task)
        task.add_done_callback(self.taken_over.discard)

    def handler(self, loop, fd: int, previous):
        def handle(number, frame):
            if self.draining:  # a second signal: no more waiting
                log.warning("signal %d again: shutting down without the rest of the drain", number)
                return previous(number, frame)
            self.draining, started = True, loop.time()
            self.last_request = started
            log.warning("signal %d: refusing new connections, answering with Connection: close until no request "
                        "starts for %g s (at most %g s), then finishing in-flight requests and exiting", number,
                        self.quiet_s, self.max_s)
            server = getattr(previous, "__self__", None)   # uvicorn's Server, whose bound handle_exit this is
            protocol, waiting = uvicorn_protocol(server), []
            try:
                with socket.socket(fileno=os.dup(fd)) as listener:
                    waiting = take_backlog(listener) if protocol else []
                    listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            for connection in waiting:
                loop.call_soon_threadsafe(self.serve_accepted, loop, protocol, connection)
            if waiting:
                log.warning("signal %d: %d connection(s) waiting to be accepted are served", number, len(waiting))
            for listening in getattr(server, "servers", None) or []:
                loop.call_soon_threadsafe(listening.close)  # a shut listener reads as ready: stop polling it (EINVAL)

            def check():
                now = loop.time()
                quiet = now - self.last_request >= self.quiet_s and not self.taken_over
                if quiet or now - started >= self.max_s:
                    previous(number, None)
                else:
                    loop.call_later(0.05, check)

            loop.call_soon_threadsafe(loop.call_later, 0.05, check)

        return handle


def take_backlog(listener: socket.socket) -> list[socket.socket]:
    """Accept every connection waiting in a (non-blocking) listening socket's backlog."""
    taken = []
    listener.setblocking(False)  # asyncio's listener is non-blocking already: this is its shared file status
    while True:
        try:
            connection, _ = listener.accept()
        except ConnectionAbortedError:  # that client gave up before it was accepted: take the next
            continue
        except OSError:  # BlockingIOError: the backlog is empty (any other error: what is left stays there)
            return taken
        connection.setblocking(False)
        taken.append(connection)


drain = Drain()  # the worker's one drain state, shared by the service's startup hook and the middleware
