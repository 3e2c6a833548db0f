"""A virtual serial line: two pseudo-terminals joined back to back, with a byte pump between them.

The gateway opens one end by its path (a symlink, e.g. `var/ttySIM0`) exactly as it would open
/dev/ttyUSB0; a simulated device opens the other. The pump is the place where a line with baud
timing or faults can later sit between the two ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tty
from pathlib import Path


class _PtyEnd:
    """One pty pair: the master is ours, the slave path is handed to a serial client."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        # Raw mode before anyone opens the slave: echo or CR/LF mangling would corrupt frames.
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        # Keeping our own slave fd open means the master never reads EIO when the
        # serial client closes and reopens the port.
        self.keep = slave
        os.set_blocking(self.master, False)

    def close(self) -> None:
        for fd in (self.master, self.keep):
            with contextlib.suppress(OSError):
                os.close(fd)


class VirtualLine:
    """A pty pair per side with a pump that copies bytes both ways."""

    def __init__(self, link: str | os.PathLike[str] | None = None) -> None:
        self._gateway = _PtyEnd()
        self._device = _PtyEnd()
        self._link = Path(link) if link else None
        self._pending: dict[int, bytearray] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bytes_to_device = 0
        self.bytes_to_gateway = 0
        self._garble = 0

    @property
    def gateway_port(self) -> str:
        """The path a gateway opens: the symlink when one was asked for, else the pty itself."""
        return str(self._link) if self._link else self._gateway.path

    @property
    def device_port(self) -> str:
        """The path a simulated device opens."""
        return self._device.path

    def start(self) -> None:
        """Create the link and start pumping (needs a running event loop)."""
        self._loop = asyncio.get_running_loop()
        if self._link:
            self._link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if self._link.is_symlink() or self._link.exists():
                    self._link.unlink()
            self._link.symlink_to(self._gateway.path)
        self._loop.add_reader(self._gateway.master, self._pump, self._gateway.master, self._device.master, True)
        self._loop.add_reader(self._device.master, self._pump, self._device.master, self._gateway.master, False)

    def _pump(self, src: int, dst: int, downstream: bool) -> None:
        try:
            data = os.read(src, 4096)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EIO):
                return
            raise
        if downstream:
            self.bytes_to_device += len(data)
        else:
            self.bytes_to_gateway += len(data)
            if self._garble and data:
                self._garble -= 1
                data = data[:-1] + bytes([data[-1] ^ 0x01])
        self._send(dst, data)

    def garble(self, reads: int = 1) -> None:
        """Flip one bit in each of the next `reads` chunks towards the gateway: noise that breaks the CRC."""
        self._garble += reads

    def _send(self, dst: int, data: bytes) -> None:
        pending = self._pending.get(dst)
        if pending:
            pending.extend(data)
            return
        try:
            n = os.write(dst, data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self._pending[dst] = bytearray(data[n:])
            assert self._loop is not None
            self._loop.add_writer(dst, self._flush, dst)

    def _flush(self, dst: int) -> None:
        pending = self._pending[dst]
        try:
            n = os.write(dst, pending)
        except BlockingIOError:
            return
        del pending[:n]
        if not pending:
            del self._pending[dst]
            assert self._loop is not None
            self._loop.remove_writer(dst)

    def close(self) -> None:
        """Stop pumping, remove the link and close both pty pairs."""
        if self._loop:
            for fd in (self._gateway.master, self._device.master):
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
            self._loop = None
        if self._link:
            with contextlib.suppress(FileNotFoundError):
                if self._link.is_symlink() and os.readlink(self._link) == self._gateway.path:
                    self._link.unlink()
        self._gateway.close()
        self._device.close()
