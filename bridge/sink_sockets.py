"""paho's socket on the asyncio loop: the reader and writer callbacks a sink registers for its client's socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt


class LoopSockets:
    """paho's socket callbacks, run on `_loop` (paho calls some from the connect's worker thread)."""

    _loop: asyncio.AbstractEventLoop | None

    def _threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            fn(*args)  # in order with paho's own unregister calls
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _socket_open(self, client: mqtt.Client, _ud: Any, sock: Any) -> None:
        self._threadsafe(self._add_reader, client, sock)

    def _add_reader(self, client: mqtt.Client, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.add_reader(sock, client.loop_read)

    def _socket_close(self, client: mqtt.Client, _ud: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _register_write(self, client: mqtt.Client, _ud: Any, sock: Any) -> None:
        self._threadsafe(self._add_writer, client, sock)

    def _add_writer(self, client: mqtt.Client, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.add_writer(sock, client.loop_write)

    def _unregister_write(self, client: mqtt.Client, _ud: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)
