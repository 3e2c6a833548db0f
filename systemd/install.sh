#!/usr/bin/env bash
# Install Fieldgate as a systemd service from the source checkout this script sits in.
#
#   sudo systemd/install.sh                       install or upgrade; enable and (re)start the service
#   sudo systemd/install.sh --uninstall           stop, disable, remove the unit and /opt/fieldgate;
#                                                 keeps /etc/fieldgate and /var/lib/fieldgate (the spools)
#   sudo systemd/install.sh --uninstall --purge   also remove those two and the fieldgate user
#
# Safe to run again: an existing /etc/fieldgate/config.yaml is never overwritten.
# Environment: PYTHON (default python3, 3.11 or newer); pip's own PIP_* variables (PIP_INDEX_URL,
# PIP_FIND_LINKS with PIP_NO_INDEX=1 for a site without internet); DESTDIR: stage every file under
# that folder instead of /, and only print what would be done to the running system (the user,
# systemctl) — for building images and for the tests.
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PYTHON=${PYTHON:-python3}
SERVICE_USER=fieldgate
UNIT=fieldgate.service
# The paths the service sees; the unit names them, so they do not move with DESTDIR.
OPT=/opt/fieldgate
CONF=/etc/fieldgate
STATE=/var/lib/fieldgate
UNIT_DIR=/etc/systemd/system

say() { printf 'fieldgate-install: %s\n' "$*"; }
warn() { printf 'fieldgate-install: warning: %s\n' "$*" >&2; }
die() {
    printf 'fieldgate-install: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# Changes to the running system (accounts, ownership, systemd) are only shown when staging.
run() {
    if [[ -n $DESTDIR ]]; then
        say "would run: $*"
    else
        "$@"
    fi
}

systemd_running() {
    [[ -z $DESTDIR && -d /run/systemd/system ]]
}

ensure_user() {
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        # dialout owns /dev/ttyUSB*, ttyACM*, ttyAMA*, ttyS*: the serial lines.
        run usermod --append --groups dialout "$SERVICE_USER"
    else
        run useradd --system --user-group --groups dialout --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "Fieldgate IoT gateway" "$SERVICE_USER"
    fi
}

BUILD=
cleanup() {
    if [[ -n $BUILD ]]; then rm -rf "$BUILD"; fi
}
trap cleanup EXIT

install_venv() {
    local venv=$DESTDIR$OPT/venv
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than 3.11 (set PYTHON=/path/to/python3.11)"
    "$PYTHON" -c 'import ensurepip' 2>/dev/null ||
        die "$PYTHON cannot create virtual environments: apt-get install python3-venv"
    if [[ ! -x $venv/bin/python ]]; then
        say "creating $OPT/venv"
        "$PYTHON" -m venv "$venv"
    fi
    # Built from a copy: a build in the checkout would leave root-owned build/ and egg-info in it.
    BUILD=$(mktemp -d)
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build \
        --exclude='*.egg-info' --exclude='__pycache__' --exclude=.pytest_cache --exclude=.mypy_cache -cf - . |
        tar -C "$BUILD" -xf -
    say "installing fieldgate from $SRC into $OPT/venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "$BUILD"
}

install_config() {
    local dir=$DESTDIR$CONF
    install -d -m 0750 "$dir"
    run chgrp "$SERVICE_USER" "$CONF"
    if [[ -e $dir/config.yaml ]]; then
        say "keeping $CONF/config.yaml"
    else
        # /etc is read-only to the service (ProtectSystem=strict): the simulator's pty link goes
        # to the state directory instead of ./var next to the config.
        sed "s#\./var/ttySIM0#$STATE/ttySIM0#g" "$SRC/config.yaml" >"$dir/config.yaml"
        chmod 0640 "$dir/config.yaml"
        run chgrp "$SERVICE_USER" "$CONF/config.yaml"
        say "installed $CONF/config.yaml"
    fi
    if grep -q '^simulator:' "$dir/config.yaml"; then
        warn "$CONF/config.yaml runs the simulator (the shipped demo): delete its simulator section," \
            "set your serial port (see systemd/README.md), then: systemctl restart fieldgate"
    fi
    if ! "$DESTDIR$OPT/venv/bin/fieldgate" check -c "$dir/config.yaml"; then
        warn "$CONF/config.yaml does not pass 'fieldgate check': the service will not start until it does"
    fi
}

install_unit() {
    install -d -m 0755 "$DESTDIR$UNIT_DIR"
    install -m 0644 "$SRC/systemd/$UNIT" "$DESTDIR$UNIT_DIR/$UNIT"
    say "installed $UNIT_DIR/$UNIT"
}

start_service() {
    if [[ -z $DESTDIR && ! -d /run/systemd/system ]]; then
        warn "systemd is not running here (a chroot or container?): start it later with" \
            "systemctl enable --now $UNIT"
        return
    fi
    run systemctl daemon-reload
    run systemctl enable "$UNIT"
    # restart, not `enable --now`: an upgrade must replace the running code.
    run systemctl restart "$UNIT"
    if systemd_running; then
        say "started; see: systemctl status fieldgate; journalctl -u fieldgate -f"
    fi
}

do_install() {
    ensure_user
    install_venv
    install_config
    install_unit
    start_service
}

do_uninstall() {
    local purge=$1 systemd=no
    if [[ -n $DESTDIR ]] || systemd_running; then systemd=yes; fi
    if [[ $systemd == yes && -e $DESTDIR$UNIT_DIR/$UNIT ]]; then
        run systemctl disable --now "$UNIT"
    fi
    rm -f "$DESTDIR$UNIT_DIR/$UNIT"
    if [[ $systemd == yes ]]; then
        run systemctl daemon-reload
    fi
    rm -rf "$DESTDIR$OPT"
    say "removed $UNIT_DIR/$UNIT and $OPT"
    if [[ $purge == yes ]]; then
        rm -rf "$DESTDIR$CONF" "$DESTDIR$STATE"
        if [[ -n $DESTDIR ]] || id -u "$SERVICE_USER" >/dev/null 2>&1; then
            run userdel "$SERVICE_USER"
        fi
        say "purged $CONF, $STATE and the $SERVICE_USER user"
    else
        say "kept $CONF and $STATE (the spools); --uninstall --purge removes them"
    fi
}

main() {
    local mode=install purge=no args="$*"
    while (($#)); do
        case $1 in
        --uninstall) mode=uninstall ;;
        --purge) mode=uninstall purge=yes ;;
        -h | --help)
            usage
            return 0
            ;;
        *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
    if [[ -z $DESTDIR && $EUID -ne 0 ]]; then
        die "run as root: sudo $0 $args"
    fi
    if [[ $mode == install ]]; then
        do_install
    else
        do_uninstall "$purge"
    fi
}

main "$@"
