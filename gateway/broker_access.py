"""The embedded broker's users and ACL from the config, and the `fieldgate passwd` command."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.broker_acl import Access, BrokerAuth, default_access
from bridge.broker_process import BrokerProcess
from bridge.broker_users import check_username, recover_users_file, set_password
from gateway.config.schema import Config
from gateway.errors import FieldgateError
from gateway.supervise import Supervisor

if TYPE_CHECKING:
    from bridge.broker import EmbeddedBroker


def users_file(cfg: Config, base: Path) -> Path | None:
    """The users file named by `broker.users`; a relative path is taken from the config file's folder."""
    if cfg.broker.users is None:
        return None
    # Under systemd the working directory is `/`: relative to the config is what a technician means.
    return base / os.path.expanduser(cfg.broker.users)


def broker_auth(cfg: Config, base: Path, internal_password: str) -> BrokerAuth | None:
    """The embedded broker's access rules; None (anonymous access) when no users file is configured.

    For the broker's start: a users file that cannot be read is moved aside and an empty one (no user)
    put in its place first (`recover_users_file`), so that it cannot keep the gateway down.
    """
    path = users_file(cfg, base)
    if path is None:
        return None
    recover_users_file(path)
    acl = cfg.broker.acl
    if acl is None:
        prefixes = [cfg.prefix_for(s) for s in cfg.northbound if s.url is None]
        default = default_access(prefixes, cfg.embedded_requests())
        return BrokerAuth(str(path), default=default, internal_password=internal_password)
    rules = {user: Access(tuple(rule.read), tuple(rule.write)) for user, rule in acl.items()}
    return BrokerAuth(str(path), acl=rules, internal_password=internal_password)


async def start_broker(
    cfg: Config, base: Path, internal_password: str, supervisor: Supervisor
) -> EmbeddedBroker | BrokerProcess | None:
    """The embedded broker as configured, started; None when `broker.enabled` is false.

    `internal_password`: what the gateway's own sinks log in with (made afresh at each start, held only in memory).
    """
    if not cfg.broker.enabled:
        return None
    auth = broker_auth(cfg, base, internal_password)
    tls = {"cert": cfg.broker.cert, "key": cfg.broker.key}
    broker: EmbeddedBroker | BrokerProcess
    if cfg.broker.process == "separate":
        broker = BrokerProcess(cfg.broker.listeners, **tls, auth=auth, supervisor=supervisor)
    else:
        from bridge.broker import EmbeddedBroker

        broker = EmbeddedBroker(cfg.broker.listeners, **tls, auth=auth)
    await broker.start()
    return broker


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise FieldgateError("the passwords do not match; nothing changed")
    if not password:
        raise FieldgateError("an empty password is not allowed; nothing changed")
    return password


def passwd(args: argparse.Namespace) -> int:
    """`fieldgate passwd [-c CONFIG] [--password-stdin] USER`: add or replace USER in `broker.users`."""
    from gateway.config import find_config, load_config

    loaded = load_config(find_config(args.config))
    path = users_file(loaded.config, Path(loaded.path).resolve().parent)
    if path is None:
        raise FieldgateError(
            f"{loaded.path}: broker.users is not set; add e.g. `users: users` under `broker:` "
            "(a file next to the config) and run this again"
        )
    check_username(args.user)
    replaced = set_password(path, args.user, _password(args))
    print(f"{path}: {'replaced' if replaced else 'added'} user {args.user}")
    return 0
