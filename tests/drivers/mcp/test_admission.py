"""Who may connect: login bans per address, their log throttle, pending counts, and the bounds of all of it."""

from __future__ import annotations

from drivers.mcp.admission import LOG_EVERY, BanList, PendingCount, address_key


def test_ten_failures_within_the_window_ban_for_ban_time() -> None:
    bans = BanList(failures=10, window=60.0, ban_time=60.0)
    for i in range(9):
        started, _ = bans.failed("10.0.0.1", 100.0 + i)
        assert not started and not bans.banned("10.0.0.1", 100.0 + i)
    started, _ = bans.failed("10.0.0.1", 109.0)
    assert started and bans.banned("10.0.0.1", 109.0)
    assert bans.banned("10.0.0.1", 168.9) and not bans.banned("10.0.0.1", 169.1)
    assert not bans.banned("10.0.0.2", 110.0)  # another address is not touched


def test_failures_spread_beyond_the_window_never_ban() -> None:
    bans = BanList(failures=3, window=10.0, ban_time=60.0)
    # One every 6 s: never 3 within 10 s.
    assert not any(bans.failed("h", t)[0] for t in (0.0, 6.0, 12.0, 18.0, 24.0))
    assert not bans.banned("h", 25.0)


def test_a_failure_is_logged_once_a_minute_per_address_with_the_count_of_those_not_logged() -> None:
    bans = BanList(failures=1000, window=60.0, ban_time=60.0)
    decisions = [bans.failed("a", 10.0 + i * 0.1)[1] for i in range(21)]
    assert [d.log for d in decisions] == [True] + [False] * 20
    assert bans.failed("b", 11.0)[1].log  # its own minute
    later = bans.failed("a", 10.0 + LOG_EVERY)[1]
    assert later.log and later.suppressed == 20


def test_the_table_is_bounded_however_many_addresses_fail() -> None:
    bans = BanList(failures=2, window=60.0, ban_time=600.0, max_tracked=100)
    for i in range(10_000):
        bans.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1000.0 + i * 0.001)
    assert len(bans) <= 100
    # The most recent addresses are the ones kept, and their state is right.
    last = "10.0.39.15"  # i = 9999
    bans.failed(last, 1010.0)
    assert bans.banned(last, 1010.0)


def test_idle_records_are_pruned_before_busy_ones() -> None:
    bans = BanList(failures=2, window=1.0, ban_time=1.0, max_tracked=1000)
    for i in range(50):
        bans.failed(f"old-{i}", 0.0)
    # Long after: window, ban and log minute all over; a new address sweeps the idle ones out.
    bans.failed("new", 10_000.0)
    assert len(bans) == 1


def test_configure_takes_new_limits_and_keeps_bans_in_force() -> None:
    bans = BanList(failures=2, window=60.0, ban_time=60.0)
    bans.failed("a", 0.0)
    bans.failed("a", 1.0)
    assert bans.banned("a", 2.0)
    bans.configure(failures=5, window=60.0, ban_time=5.0)
    assert bans.banned("a", 30.0)  # the ban it had keeps its end
    for t in (70.0, 71.0, 72.0, 73.0):
        assert not bans.failed("a", t)[0]
    assert bans.failed("a", 74.0)[0] and not bans.banned("a", 79.5)


def test_pending_counts_drop_their_entries_at_zero() -> None:
    pending = PendingCount()
    for _ in range(3):
        pending.add("a")
    pending.add("b")
    assert (pending.total, pending.of("a"), pending.of("b")) == (4, 3, 1)
    for _ in range(3):
        pending.remove("a")
    pending.remove("b")
    assert pending.total == 0 and pending.by_key == {}


def test_address_keys() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    # Every address of one IPv6 /64 is one key: a host cannot rotate through its 2^64 addresses.
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert len(address_key("x" * 10_000)) == 64
