"""The embedded broker's users and ACL: real amqtt (inline and in its child process), real paho clients."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge import broker_auth, statefiles
from bridge.broker import EmbeddedBroker
from bridge.broker_acl import Access, BrokerAuth, covers, default_access
from bridge.broker_process import BrokerProcess
from bridge.broker_users import INTERNAL_USER, read_users, set_password
from gateway.app import Gateway
from gateway.config import load_config
from gateway.errors import FieldgateError

import configs  # qualified: `broker` is this file's own
from configs import Section
from helpers import free_port, until
from mosquitto import make_tls_files

_ids = itertools.count()
SECRET = "internal-secret"


@pytest.fixture(autouse=True)
def counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The corrupt-file and login counters are process-wide: this module's count from zero, others' stay.

    A fresh login gate per test, too: its thread pool does not survive a fork (mutation testing forks each
    mutant's test run from a process that has run the tests), and a gate whose threads are gone hangs every login.
    """
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))
    monkeypatch.setattr(broker_auth, "LOGINS", broker_auth.LoginGate())


class Client:
    """A blocking paho client (run its calls off the loop the broker runs on) that records what it receives."""

    def __init__(
        self,
        port: int,
        user: str | None = None,
        password: str | None = None,
        *,
        transport: Literal["tcp", "websockets"] = "tcp",
        tls: ssl.SSLContext | None = None,
        client_id: str | None = None,
        clean_session: bool = True,
    ) -> None:
        self.port = port
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"auth-test-{next(_ids)}",
            transport=transport,
            clean_session=clean_session,
        )
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls is not None:
            self.c.tls_set_context(tls)
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._suback = threading.Event()
        self.reason: mqtt.ReasonCode | None = None
        self._granted: list[mqtt.ReasonCode] = []
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        self.reason = reason
        self._connack.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _m: int, codes: list[mqtt.ReasonCode], _p: object) -> None:
        self._granted = codes
        self._suback.set()

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, bytes(m.payload)))

    def connect(self) -> bool:
        """Connect; True if the broker accepted the login (a refused client is closed at once)."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:
            return False
        self.c.loop_start()
        got = self._connack.wait(5)
        if not got or self.reason is None or self.reason.is_failure:
            self.close()  # paho would keep retrying a refused login
            return False
        return True

    def subscribe(self, topic: str) -> bool:
        """Subscribe with QoS 1; True if the broker granted it."""
        self._suback.clear()
        self.c.subscribe(topic, qos=1)
        assert self._suback.wait(5), "no SUBACK"
        return not self._granted[0].is_failure

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the PUBACK (which amqtt sends even for a refused topic)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def on(self, topic: str) -> list[bytes]:
        """Payloads received on `topic`."""
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.c.disconnect()
        self.c.loop_stop()


@asynccontextmanager
async def connected(
    port: int, user: str | None = None, password: str | None = None, **kw: Any
) -> AsyncIterator[Client]:
    """A client that must get in."""
    c = Client(port, user, password, **kw)
    assert await asyncio.to_thread(c.connect), f"{user!r} was refused: {c.reason}"
    try:
        yield c
    finally:
        await asyncio.to_thread(c.close)


async def logs_in(port: int, user: str | None = None, password: str | None = None, **kw: Any) -> bool:
    """True if the broker accepts this login."""
    c = Client(port, user, password, **kw)
    ok = await asyncio.to_thread(c.connect)
    if ok:
        await asyncio.to_thread(c.close)
    return ok


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A users file with alice (pw-a), bob (pw-b) and carol (pw-c); hashed once per module, argon2 is slow on purpose.

    No ACL here names carol: she is the valid user an ACL leaves out.
    """
    path = tmp_path_factory.mktemp("users") / "users"
    set_password(path, "alice", "pw-a")
    set_password(path, "bob", "pw-b")
    set_password(path, "carol", "pw-c")
    return path


def auth_for(users: Path, acl: dict[str, Access] | None = None) -> BrokerAuth:
    """Access as the gateway builds it for prefix `fg/t1`: the default rules, or exactly `acl`."""
    if acl is None:
        return BrokerAuth(str(users), default=default_access(["fg/t1"]), internal_password=SECRET)
    return BrokerAuth(str(users), acl=acl, internal_password=SECRET)


@asynccontextmanager
async def broker(
    auth: BrokerAuth | None, kind: type[EmbeddedBroker] | type[BrokerProcess] = EmbeddedBroker
) -> AsyncIterator[int]:
    """A running broker on a free port; yields the port."""
    port = free_port()
    b = kind([f"tcp://127.0.0.1:{port}"], auth=auth)
    await b.start()
    try:
        yield port
    finally:
        await b.stop()


# --- topic patterns -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("#", "a/b", True),
        ("#", "#", True),
        ("#", "$SYS/broker/load", False),  # MQTT: wildcards at the first level never match `$` topics
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/load", True),
        ("fg/t1/+/set/+", "fg/t1/plc/set/sp", True),
        ("fg/t1/+/set/+", "fg/t1/plc/set/sp/result", False),
        ("fg/t1/+/set/+", "fg/t1/plc/set", False),
        ("fg/t1/+/cmd", "fg/t1/pump/cmd", True),
        ("fg/#", "fg", True),  # `#` includes the parent level
        ("fg/#", "fg/t1/+/status", True),
        ("fg/t1/#", "fg/#", False),  # a filter broader than the pattern is not covered
        ("fg/+/x", "fg/+/x", True),
        ("fg/a/x", "fg/+/x", False),
        ("fg/+/x", "fg/#", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_covers(pattern: str, topic: str, expected: bool) -> None:
    assert covers(pattern, topic) is expected


def test_default_access_reads_everything_and_writes_only_requests() -> None:
    a = default_access(["fg/t1", "fg/t1", "other"])
    assert a.may_read("#") and a.may_read("fg/t1/+/telemetry")
    assert a.may_write("fg/t1/plc/set/sp") and a.may_write("other/pump/cmd")
    assert not a.may_write("fg/t1/plc/sp") and not a.may_write("fg/t1/status")
    assert len(a.write) == 4  # the repeated prefix once


def test_the_internal_password_stays_out_of_repr() -> None:
    assert SECRET not in repr(auth_for(Path("users")))


# --- logins ---------------------------------------------------------------------------------------


async def test_without_users_anyone_gets_in() -> None:
    async with broker(None) as port:
        assert await logs_in(port)
        assert await logs_in(port, "whoever", "whatever")


@pytest.mark.parametrize("kind", [EmbeddedBroker, BrokerProcess], ids=["inline", "process"])
async def test_with_users_only_the_right_password_gets_in(users: Path, kind: type[EmbeddedBroker]) -> None:
    async with broker(auth_for(users), kind) as port:
        assert await logs_in(port, "alice", "pw-a")
        assert await logs_in(port, "bob", "pw-b")
        assert not await logs_in(port)  # anonymous
        assert not await logs_in(port, "alice", "pw-b")
        assert not await logs_in(port, "alice")  # a username without a password
        assert not await logs_in(port, "mallory", "pw-a")
        assert await logs_in(port, INTERNAL_USER, SECRET)
        assert not await logs_in(port, INTERNAL_USER, "guess")


async def test_a_user_added_while_the_broker_runs_gets_in_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "pw-a")
    async with broker(auth_for(path)) as port:
        assert not await logs_in(port, "carol", "pw-c")
        set_password(path, "carol", "pw-c")
        assert await logs_in(port, "carol", "pw-c")
        set_password(path, "carol", "new")  # a changed password takes effect as well
        assert not await logs_in(port, "carol", "pw-c")
        path.write_text("garbage\n")  # a broken file keeps the users read before
        assert await logs_in(port, "carol", "new")


@pytest.mark.parametrize("kind", [EmbeddedBroker, BrokerProcess], ids=["inline", "process"])
async def test_a_missing_or_bad_users_file_is_one_clear_error(tmp_path: Path, kind: type[EmbeddedBroker]) -> None:
    port = free_port()
    with pytest.raises(FieldgateError, match="cannot read the broker users file"):
        await kind([f"tcp://127.0.0.1:{port}"], auth=auth_for(tmp_path / "nope")).start()
    bad = tmp_path / "users"
    bad.write_text("# ok\n\nalice:plaintext-password\n")
    with pytest.raises(FieldgateError, match=r"users:3: not USER:ARGON2-HASH") as caught:
        await kind([f"tcp://127.0.0.1:{port}"], auth=auth_for(bad)).start()
    assert "plaintext-password" not in str(caught.value)


# --- the ACL --------------------------------------------------------------------------------------


async def test_default_rules_users_read_all_and_write_only_set_and_cmd(users: Path) -> None:
    async with (
        broker(auth_for(users)) as port,
        connected(port, INTERNAL_USER, SECRET) as gateway,
        connected(port, "alice", "pw-a") as alice,
        connected(port, "bob", "pw-b") as bob,
    ):
        assert await asyncio.to_thread(gateway.subscribe, "#")
        assert await asyncio.to_thread(bob.subscribe, "fg/#")
        assert not await asyncio.to_thread(bob.subscribe, "$SYS/#")
        await asyncio.to_thread(alice.publish, "fg/t1/plc/sp", "99")  # a forged value: refused
        await asyncio.to_thread(alice.publish, "elsewhere", "x")  # refused
        await asyncio.to_thread(alice.publish, "fg/t1/plc/set/sp", "10")
        await asyncio.to_thread(alice.publish, "fg/t1/pump/cmd", "{}")
        await asyncio.to_thread(gateway.publish, "fg/t1/plc/sp", "10")  # the gateway may publish anything
        await until(lambda: bob.on("fg/t1/plc/sp"), 5)
        await until(lambda: gateway.on("fg/t1/pump/cmd"), 5)
        # In order per client: alice's refused messages came before her accepted ones, so they are not late.
        assert [t for t, _ in gateway.messages if t != "fg/t1/plc/sp"] == ["fg/t1/plc/set/sp", "fg/t1/pump/cmd"]
        assert bob.on("fg/t1/plc/sp") == [b"10"]


async def test_an_acl_limits_each_user_to_its_topics(users: Path) -> None:
    acl = {
        "alice": Access(read=("fg/t1/#",), write=("fg/t1/+/set/+",)),
        "bob": Access(read=("fg/t1/+/telemetry",)),
    }
    async with (
        broker(auth_for(users, acl)) as port,
        connected(port, INTERNAL_USER, SECRET) as gateway,
        connected(port, "alice", "pw-a") as alice,
        connected(port, "bob", "pw-b") as bob,
    ):
        assert await asyncio.to_thread(gateway.subscribe, "#")
        assert await asyncio.to_thread(bob.subscribe, "fg/t1/+/telemetry")
        assert not await asyncio.to_thread(bob.subscribe, "fg/t1/#")  # broader than what bob may read
        assert not await asyncio.to_thread(bob.subscribe, "#")
        assert await asyncio.to_thread(alice.subscribe, "fg/t1/#")
        await asyncio.to_thread(bob.publish, "fg/t1/plc/set/sp", "1")  # bob may not write
        await asyncio.to_thread(alice.publish, "fg/t1/pump/cmd", "{}")  # nor may alice send commands
        await asyncio.to_thread(alice.publish, "fg/t1/plc/set/sp", "2")
        await asyncio.to_thread(gateway.publish, "fg/t1/plc/telemetry", "{}")
        await asyncio.to_thread(gateway.publish, "fg/t1/plc/status", "online")
        await until(lambda: bob.on("fg/t1/plc/telemetry") and alice.on("fg/t1/plc/status"), 5)
        assert gateway.on("fg/t1/plc/set/sp") == [b"2"] and not gateway.on("fg/t1/pump/cmd")
        assert {t for t, _ in bob.messages} == {"fg/t1/plc/telemetry"}


@pytest.mark.parametrize("kind", [EmbeddedBroker, BrokerProcess], ids=["inline", "process"])
async def test_a_user_the_acl_does_not_name_logs_in_but_can_neither_read_nor_write(
    users: Path, kind: type[EmbeddedBroker]
) -> None:
    """carol holds a valid password; the ACL names alice and bob only, so carol gets nothing at all."""
    acl = {"alice": Access(read=("#",), write=("fg/#",)), "bob": Access(read=("fg/t1/+/telemetry",))}
    async with (
        broker(auth_for(users, acl), kind) as port,
        connected(port, INTERNAL_USER, SECRET) as gateway,
        connected(port, "alice", "pw-a") as alice,
        connected(port, "carol", "pw-c") as carol,
    ):
        assert await asyncio.to_thread(gateway.subscribe, "#")
        assert await asyncio.to_thread(alice.subscribe, "#")
        # A retained value first: a granted subscription would be handed it at once, whatever came after.
        await asyncio.to_thread(gateway.publish, "fg/t1/plc/sp", "10", retain=True)
        for topic_filter in ("#", "fg/#", "fg/t1/plc/sp", "fg/t1/+/telemetry", "fg/t1/+/set/+"):
            assert not await asyncio.to_thread(carol.subscribe, topic_filter), topic_filter
        # Every kind of topic the gateway acts on, a retained forgery among them; each is PUBACKed (MQTT 3.1.1).
        for topic, retain in (
            ("fg/t1/plc/set/sp", False),
            ("fg/t1/pump/cmd", False),
            ("fg/t1/plc/sp", True),
            ("fg/t1/plc/telemetry", False),
            ("elsewhere", False),
        ):
            await asyncio.to_thread(carol.publish, topic, "666", retain=retain)
        # Published after carol's PUBACKs: once both subscribers have these, carol's would have come too.
        await asyncio.to_thread(alice.publish, "fg/t1/marker", "after")
        await asyncio.to_thread(gateway.publish, "fg/t1/plc/telemetry", "{}")
        await until(lambda: gateway.on("fg/t1/marker") and alice.on("fg/t1/plc/telemetry"), 5)
        # The markers above order gateway's and alice's deliveries; carol may read nothing, so nothing can
        # mark hers: a generous wait (after the markers) for a late delivery to her.
        await asyncio.sleep(1.0)
        assert [t for t, p in gateway.messages if p == b"666"] == []
        assert [t for t, p in alice.messages if p == b"666"] == []
        assert carol.messages == []
        # The broker kept the gateway's retained value, not carol's forgery.
        async with connected(port, "alice", "pw-a") as late:
            assert await asyncio.to_thread(late.subscribe, "fg/t1/plc/sp")
            await until(lambda: late.on("fg/t1/plc/sp"), 5)
            assert set(late.on("fg/t1/plc/sp")) == {b"10"}  # (amqtt may hand a retained message twice)


async def test_a_will_is_a_publish_and_needs_the_same_right(users: Path) -> None:
    acl = {
        "alice": Access(read=("fg/t1/#",), write=("fg/t1/+/set/+",)),
        "bob": Access(read=("fg/t1/+/telemetry",)),
    }
    async with broker(auth_for(users, acl)) as port, connected(port, INTERNAL_USER, SECRET) as gateway:
        assert await asyncio.to_thread(gateway.subscribe, "#")
        # amqtt would publish (and retain) a will unchecked: bob, who may write nothing, could set a point with one.
        sneaky = Client(port, "bob", "pw-b")
        sneaky.c.will_set("fg/t1/plc/set/sp", b"666", qos=1, retain=True)
        assert not await asyncio.to_thread(sneaky.connect)
        allowed = Client(port, "alice", "pw-a")
        allowed.c.will_set("fg/t1/plc/set/sp", b"7", qos=1)
        assert await asyncio.to_thread(allowed.connect)  # a will within the user's rights is fine
        await asyncio.to_thread(allowed.close)
        # A marker on the same topic, published after both clients have gone: amqtt publishes a will when the
        # connection ends, so bob's would be on its way before this.
        await asyncio.to_thread(gateway.publish, "fg/t1/plc/set/sp", "marker")
        await until(lambda: b"marker" in gateway.on("fg/t1/plc/set/sp"), 5)
        assert b"666" not in gateway.on("fg/t1/plc/set/sp")


async def test_a_session_taken_over_by_client_id_gets_only_what_its_new_user_may_read(users: Path) -> None:
    """amqtt hands a persistent session, subscriptions and all, to whoever connects with its client id."""
    acl = {"alice": Access(read=("#",)), "bob": Access(read=("fg/t1/+/telemetry",))}
    async with broker(auth_for(users, acl)) as port:
        async with connected(port, "alice", "pw-a", client_id="shared", clean_session=False) as alice:
            assert await asyncio.to_thread(alice.subscribe, "fg/#")
        async with (
            connected(port, "bob", "pw-b", client_id="shared", clean_session=False) as bob,
            connected(port, INTERNAL_USER, SECRET) as gw,
        ):
            await asyncio.to_thread(gw.publish, "fg/t1/plc/sp", "1")
            await asyncio.to_thread(gw.publish, "fg/t1/plc/telemetry", "{}")
            await until(lambda: bob.on("fg/t1/plc/telemetry"), 5)
            assert not bob.on("fg/t1/plc/sp")


# --- TLS listeners ----------------------------------------------------------------------------------


async def test_mqtts_and_wss_listeners_take_tls_clients_with_passwords(users: Path, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    tcp, mqtts, wss = free_port(), free_port(), free_port()
    b = EmbeddedBroker(
        [f"tcp://127.0.0.1:{tcp}", f"mqtts://127.0.0.1:{mqtts}", f"wss://127.0.0.1:{wss}"],
        cert=str(tls.server_cert),
        key=str(tls.server_key),
        auth=auth_for(users),
    )
    await b.start()
    try:
        ctx = tls.client_context(with_cert=False)
        async with (
            connected(tcp, INTERNAL_USER, SECRET) as gateway,
            connected(mqtts, "alice", "pw-a", tls=ctx) as over_tls,
            connected(wss, "bob", "pw-b", tls=ctx, transport="websockets") as over_wss,
        ):
            assert await asyncio.to_thread(gateway.subscribe, "fg/#")
            await asyncio.to_thread(over_tls.publish, "fg/t1/plc/set/a", "1")
            await asyncio.to_thread(over_wss.publish, "fg/t1/plc/set/b", "2")
            await until(lambda: gateway.on("fg/t1/plc/set/a") and gateway.on("fg/t1/plc/set/b"), 5)
        assert not await logs_in(mqtts, "alice", "wrong", tls=ctx)
        assert not await logs_in(mqtts, "alice", "pw-a")  # plain MQTT on the TLS port
    finally:
        await b.stop()


def test_users_file_lines_are_argon2(users: Path) -> None:
    got = read_users(users)
    assert set(got) == {"alice", "bob", "carol"} and all(h.startswith("$argon2id$") for h in got.values())


# --- a real gateway -------------------------------------------------------------------------------


def acl_config(port: int, process: str) -> Section:
    """A plc with a writable point; the broker's users file `users` (beside the config) and an ACL for two of them."""
    acl = {"alice": {"read": ["fieldgate/#"], "write": ["fieldgate/t1/+/set/+"]}, "bob": {"read": ["fieldgate/#"]}}
    plc = configs.device(
        "plc",
        1,
        poll="100ms",
        points=[configs.point("level", "input", 0), configs.point("sp", "holding", 50, "uint16", writable=True)],
    )
    return configs.config(
        broker=configs.broker(port, process=process, users="users", acl=acl),
        buses=[configs.line("line", "./ttyA", plc)],
        simulator=configs.simulator(modbus=[configs.sim_line("./ttyA", configs.sim_slave(1, {"level": {"value": 7}}))]),
    )


@pytest.mark.parametrize("process", ["separate", "inline"])
async def test_through_a_gateway_only_a_user_allowed_to_write_sets_a_point(
    users: Path, tmp_path: Path, process: str
) -> None:
    port = free_port()
    (tmp_path / "users").write_bytes(users.read_bytes())
    path = configs.write(acl_config(port, process), tmp_path)
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        assert gw.simulation is not None
        sim = next(iter(gw.simulation.simulators.values()))
        sim.set(1, "sp", 5)
        async with (
            connected(port, "bob", "pw-b") as bob,
            connected(port, "alice", "pw-a") as alice,
            connected(port, "carol", "pw-c") as carol,  # in the users file, not in the config's ACL
        ):
            assert await asyncio.to_thread(bob.subscribe, "fieldgate/#")
            assert not await asyncio.to_thread(carol.subscribe, "fieldgate/#")
            # The gateway's own sink got in: its retained status and the polled values are there.
            await until(lambda: b"online" in bob.on("fieldgate/t1/status") and bob.on("fieldgate/t1/plc/level"), 5)
            assert bob.on("fieldgate/t1/plc/level")[-1] == b"7"
            sim.set(1, "level", 8)
            await until(lambda: bob.on("fieldgate/t1/plc/telemetry"), 5)

            await asyncio.to_thread(carol.publish, "fieldgate/t1/plc/set/sp", "66")  # PUBACKed, not delivered
            await asyncio.to_thread(bob.publish, "fieldgate/t1/plc/set/sp", "55")  # PUBACKed, not delivered
            await asyncio.to_thread(alice.publish, "fieldgate/t1/plc/set/sp", "10")
            await until(lambda: bob.on("fieldgate/t1/plc/set/sp/result"), 5)
            # A second request of alice's, after the first was answered: the gateway takes a point's requests
            # one after the other, so a result of bob's or carol's, were they delivered, would be among these.
            await asyncio.to_thread(alice.publish, "fieldgate/t1/plc/set/sp", "12")
            await until(lambda: len(bob.on("fieldgate/t1/plc/set/sp/result")) >= 2, 5)
            assert bob.on("fieldgate/t1/plc/set/sp/result") == [
                b'{"ok":true,"value":10,"error":null}',
                b'{"ok":true,"value":12,"error":null}',
            ]
            assert sim.get(1, "sp") == 12
            assert carol.messages == []
        # Anonymous clients stay out, and a client that reuses the default sink client id disturbs nothing.
        assert not await logs_in(port)
        assert not await logs_in(port, "mallory", "x", client_id="fieldgate-t1-local")
        async with connected(port, "alice", "pw-a") as alice:
            assert await asyncio.to_thread(alice.subscribe, "fieldgate/t1/plc/set/sp/result")
            await asyncio.to_thread(alice.publish, "fieldgate/t1/plc/set/sp", "11")
            await until(lambda: alice.on("fieldgate/t1/plc/set/sp/result"), 5)
            assert sim.get(1, "sp") == 11
    finally:
        await gw.stop()
