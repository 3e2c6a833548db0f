"""The broker ACL's decisions, asked directly: topic coverage, per-user access and the amqtt topic plugin.

The broker tests (test_broker_auth.py) prove the ACL through real clients; these ask the same functions the
plugin asks, in-process, so that every rule has a check that needs no login and no socket.
"""

from __future__ import annotations

import pytest
from amqtt.contexts import Action, BaseContext
from amqtt.session import Session

from bridge.broker_acl import Access, BrokerAuth, covers, default_access
from bridge.broker_auth import TopicAclPlugin
from bridge.broker_users import INTERNAL_USER

ALICE = Access(read=("plant/#", "alarms/+/active"), write=("plant/+/set/+", "plant/+/cmd"))


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("+/x", "a/x", True),  # `+` at the first level matches any level that is not `$…`
        ("+/x", "$SYS/x", False),
        ("+/x", "a/y", False),  # the levels after a `+` are still compared
        ("fg/+/x", "fg/a/y", False),
        ("fg/+/x", "fg/a/x/y", False),
        ("a/#", "a/$x", True),  # the `$` rule holds at the first level only
        ("a/+", "a/$x", True),
        ("#", "$SYS", False),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/#", False),  # a `#` filter is broader than `+`
    ],
)
def test_a_pattern_covers_exactly_the_topics_mqtt_would_match(pattern: str, topic: str, expected: bool) -> None:
    assert covers(pattern, topic) is expected


def test_a_user_may_use_a_topic_any_one_of_its_patterns_covers() -> None:
    assert ALICE.may_read("plant/pump-1/flow") and ALICE.may_read("alarms/pump-1/active")
    assert not ALICE.may_read("alarms/pump-1/cleared") and not ALICE.may_read("#")
    assert ALICE.may_write("plant/pump-1/set/speed") and ALICE.may_write("plant/pump-1/cmd")
    assert not ALICE.may_write("plant/pump-1/flow")
    assert not Access().may_read("a") and not Access().may_write("a")


def test_the_acl_gives_a_named_user_its_own_access_and_anyone_else_the_default() -> None:
    fallback = default_access(["plant"])
    auth = BrokerAuth("users", acl={"alice": ALICE}, default=fallback)
    assert auth.access("alice") == ALICE
    assert auth.access("mallory") == fallback
    assert BrokerAuth("users", acl={"alice": ALICE}).access("mallory") == Access()


def plugin(auth: BrokerAuth) -> TopicAclPlugin:
    """The topic plugin as amqtt builds it: its Config from the same JSON the broker child is given."""
    context = BaseContext()
    context.config = TopicAclPlugin.Config(auth=auth.to_json())  # type: ignore[assignment]
    return TopicAclPlugin(context)


def session(user: str | None) -> Session:
    """An amqtt session logged in as `user`."""
    s = Session()
    s.username = user
    return s


async def test_the_plugin_allows_subscribe_by_read_rights_and_publish_by_write_rights() -> None:
    acl = plugin(BrokerAuth("users", acl={"alice": ALICE}))
    alice = session("alice")

    async def may(action: Action | None, topic: str) -> bool:
        return await acl.topic_filtering(session=alice, topic=topic, action=action)

    assert await may(Action.SUBSCRIBE, "plant/#") is True
    assert await may(Action.PUBLISH, "plant/pump-1/flow") is False  # readable, not writable
    assert await may(Action.PUBLISH, "plant/pump-1/set/speed") is True
    assert await may(Action.SUBSCRIBE, "plant/+/set/speed/result") is True
    assert await may(Action.SUBSCRIBE, "other/#") is False
    # Each message delivered is checked against the user's read rights again (a session taken over by client id).
    for _ in range(2):  # the answer is cached; the second must be the same
        assert await may(Action.RECEIVE, "plant/pump-1/flow") is True
        assert await may(Action.RECEIVE, "other/x") is False
    assert await may(None, "plant/pump-1/flow") is False  # an action it does not know is a no


async def test_the_plugin_refuses_what_it_cannot_attribute_and_lets_the_gateway_through() -> None:
    open_default = BrokerAuth("users", acl={"alice": ALICE}, default=Access(read=("#",), write=("#",)))
    acl = plugin(open_default)
    assert await acl.topic_filtering(session=None, topic="plant/x", action=Action.SUBSCRIBE) is False
    assert await acl.topic_filtering(session=session("alice"), topic="", action=Action.SUBSCRIBE) is False
    assert await acl.topic_filtering(session=session(None), topic="plant/x", action=Action.SUBSCRIBE) is False
    assert await acl.topic_filtering(session=session(""), topic="plant/x", action=Action.PUBLISH) is False
    # The default applies to users the ACL does not name, here everything.
    assert await acl.topic_filtering(session=session("bob"), topic="plant/x", action=Action.PUBLISH) is True
    # The gateway's own sinks may do anything, `$` topics included, whatever the ACL says.
    strict = plugin(BrokerAuth("users", acl={"alice": ALICE}))
    gateway = session(INTERNAL_USER)
    for action in (Action.SUBSCRIBE, Action.PUBLISH, Action.RECEIVE):
        assert await strict.topic_filtering(session=gateway, topic="$SYS/x", action=action) is True
    assert await strict.topic_filtering(session=session("bob"), topic="plant/x", action=Action.RECEIVE) is False


async def test_the_per_delivery_check_remembers_a_bounded_number_of_answers() -> None:
    # RECEIVE is asked per message delivered: a client that publishes ever new topics must not grow the cache.
    acl = plugin(BrokerAuth("users", acl={"alice": ALICE}))
    alice = session("alice")
    for n in range(5000):
        await acl.topic_filtering(session=alice, topic=f"plant/pump-{n}/flow", action=Action.RECEIVE)
    assert acl._receive.cache_info().currsize <= 4096
