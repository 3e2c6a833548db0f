"""The embedded broker's topic ACL: which filters each user may subscribe to and which topics it may publish to.

MQTT matching made to work on filters (`covers`), with MQTT's `$` rule; `BrokerAuth` is the whole of who may
connect and what each user may do, in a JSON-able form that the broker child process gets as the inline broker
does. The amqtt plugins that apply it are in `bridge/broker_auth.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The module of the amqtt plugins that apply a BrokerAuth (named in amqtt's config, never imported here).
PLUGINS = "bridge.broker_auth"


def covers(pattern: str, topic: str) -> bool:
    """True if every topic that `topic` (a topic or a filter) can match is matched by `pattern`.

    MQTT matching, made to work on filters: `+` in `topic` is covered only by `+` or `#`, `#` only by
    `#`. As in MQTT, a wildcard at the first level never matches a topic starting with `$`.
    """
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return not (i == 0 and t[0].startswith("$"))
        if i >= len(t) or t[i] == "#":
            return False
        if level == "+":
            if i == 0 and t[0].startswith("$"):
                return False
            continue
        if t[i] != level:  # a `+` in the topic is broader than any literal level
            return False
    return len(t) == len(p)


@dataclass(frozen=True)
class Access:
    """What one user may do: filters it may subscribe to (read) and topics it may publish to (write)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def may_read(self, topic_filter: str) -> bool:
        """True if a subscription to `topic_filter` stays within what this user may read."""
        return any(covers(p, topic_filter) for p in self.read)

    def may_write(self, topic: str) -> bool:
        """True if this user may publish to `topic`."""
        return any(covers(p, topic) for p in self.write)


def default_access(prefixes: list[str], requests: Sequence[str] = ()) -> Access:
    """What any user may do without an ACL: read everything (not `$…`), write only requests: set/cmd under each of
    `prefixes`, and the topics of `requests` (a Sparkplug node's commands and its primary host's STATE)."""
    write = [t for p in prefixes for t in (f"{p}/+/set/+", f"{p}/+/cmd")] + list(requests)
    return Access(read=("#",), write=tuple(dict.fromkeys(write)))


@dataclass(frozen=True)
class BrokerAuth:
    """Who may connect to the embedded broker (the users file) and what each user may do."""

    users_file: str
    acl: Mapping[str, Access] = field(default_factory=dict)
    #: For users the ACL does not name; `Access()` (nothing) when an ACL is given.
    default: Access = Access()
    #: The password of INTERNAL_USER, made at each start and held only in memory.
    internal_password: str | None = field(default=None, repr=False)

    def access(self, user: str) -> Access:
        """The access of an authenticated user."""
        return self.acl.get(user, self.default)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (for amqtt's plugin config and the broker child's stdin)."""
        return {
            "users_file": self.users_file,
            "acl": {u: {"read": list(a.read), "write": list(a.write)} for u, a in self.acl.items()},
            "default": {"read": list(self.default.read), "write": list(self.default.write)},
            "internal_password": self.internal_password,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerAuth:
        """The inverse of `to_json`."""

        def access(d: Mapping[str, Any]) -> Access:
            return Access(tuple(d.get("read", ())), tuple(d.get("write", ())))

        return cls(
            users_file=data["users_file"],
            acl={u: access(a) for u, a in data.get("acl", {}).items()},
            default=access(data.get("default", {})),
            internal_password=data.get("internal_password"),
        )

    def plugins(self) -> dict[str, Any]:
        """amqtt's `plugins` section: users-file authentication and the topic ACL (no anonymous access)."""
        cfg = {"auth": self.to_json()}
        return {f"{PLUGINS}.UsersAuthPlugin": cfg, f"{PLUGINS}.TopicAclPlugin": cfg}
