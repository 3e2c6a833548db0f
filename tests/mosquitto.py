"""A real Mosquitto broker process for tests: start, stop, kill and restart on one port, with or without TLS."""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hil.mosquitto_conf import base_config

MISSING = "mosquitto is not installed: run `make test` once (it installs Debian's mosquitto package)"


class MosquittoError(RuntimeError):
    """Mosquitto is missing, would not start, or exited on its own."""


def find_mosquitto() -> str:
    """The mosquitto executable (PATH, then /usr/sbin, where Debian puts it); MosquittoError if there is none."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MosquittoError(MISSING)
    return found


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        """A client SSL context that trusts the test CA and, unless told not to, presents the client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fieldgate tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA, a server certificate (127.0.0.1, ::1, localhost) and a client certificate signed by it (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    # Backdated a little so a clock a few seconds behind does not see "not yet valid".
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Fieldgate test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ],
    )
    client_key, client_cert = leaf("fieldgate-test-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, files.server_key)
    _write_key(client_key, files.client_key)
    return files


_live: set[Mosquitto] = set()


@atexit.register
def _kill_leftovers() -> None:
    # A broker must not outlive the test run, even one whose fixture never reached its teardown.
    for broker in list(_live):
        broker.kill()


class Mosquitto:
    """One Mosquitto process on 127.0.0.1:`port`, its config and log in `workdir`; plain MQTT, or TLS with `tls`."""

    def __init__(self, workdir: Path, port: int, *, tls: TlsFiles | None = None, extra_config: str = "") -> None:
        self.executable = find_mosquitto()
        self.workdir = workdir
        self.port = port
        self.tls = tls
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.extra_config = extra_config
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        lines = base_config(self.port)
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        """The broker's address as the gateway's sink config takes it."""
        return f"{'mqtts' if self.tls is not None else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may be killed or have exited on its own)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self, timeout: float = 5.0) -> None:
        """Spawn mosquitto and return once its port accepts connections; MosquittoError with the log tail if not."""
        if self.running:
            return
        self._reap()
        if self._accepts():
            # Otherwise the readiness probe below would take that other listener for this broker.
            raise MosquittoError(f"port {self.port} is already taken by another listener")
        self._log_file = self.log.open("ab")
        self._log_file.write(f"--- start {self.starts + 1} ---\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self.workdir,
        )
        self.starts += 1
        _live.add(self)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise MosquittoError(f"mosquitto exited with {code} on start; log:\n{self.log_tail()}")
            if self._accepts():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise MosquittoError(f"mosquitto not listening on {self.port} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait for the exit (SIGKILL if it takes longer than `timeout`); a no-op when not running."""
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL (no goodbye to clients, as a crash or power loss) and reap it."""
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._reap()

    def restart(self, timeout: float = 5.0) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop(timeout)
        self.start(timeout)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None:
            _live.discard(self)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Mosquitto({self.url}, {'running' if self.running else 'stopped'})"
