#!/bin/sh
# Install, upgrade or remove the fleetmq device agent on a Raspberry Pi (or
# any systemd Linux). Idempotent: running it again upgrades the binary and
# the unit and keeps the enrollment.
#
#   sudo sh install-agent.sh --server https://fleet.example:8443 --token - [--id pi-kitchen]
#   (paste the token, Enter: it goes through stdin, never on a command line,
#   where `ps` and the shell history would show it)
#   sudo sh install-agent.sh --uninstall [--purge]
#
# The binary is taken from --binary, or from --dist DIR (default: this
# script's folder) as device-agent-linux-<arch> for `uname -m`. The unit is
# device-agent.service from the same folder. scripts/build-agent.sh puts all
# three in dist/.
#
# --root DIR installs into DIR instead of / (for tests and image builds): it
# writes only below DIR and prints the system commands (useradd, chown,
# runuser, systemctl) instead of running them. For tests, RUN_SYSTEM_COMMANDS=1
# runs them anyway, as found on PATH (fakes), with the same arguments.
set -eu

NAME=device-agent
AGENT_USER=device-agent
BIN_PATH=/usr/local/bin/device-agent
UNIT_PATH=/etc/systemd/system/device-agent.service
WANTS_DIR=/etc/systemd/system/multi-user.target.wants
STATE_PATH=/var/lib/device-agent

usage() {
	cat <<'USAGE'
usage: install-agent.sh --server URL --token TOKEN [--id ID] [--force]
                        [--binary PATH | --dist DIR] [--root DIR]
       install-agent.sh --uninstall [--purge] [--root DIR]

  --server URL    enrollment server, https://host:port
  --token TOKEN   bootstrap token; "-" reads it from stdin, which keeps it
                  out of `ps` and the shell history. Read and needed only
                  when enrolling (not on an upgrade of an enrolled device)
  --id ID         device id to ask for (default: the id bound to the token)
  --force         enroll again even if already enrolled
  --binary PATH   agent binary to install
  --dist DIR      folder with device-agent-linux-<arch> (default: script folder)
  --root DIR      install below DIR; print system commands instead of running them
  --uninstall     stop, disable and remove the agent (keeps its state)
  --purge         with --uninstall: also delete the state folder and the user
USAGE
}

die() {
	printf '%s: %s\n' "$NAME install" "$*" >&2
	exit 1
}

say() {
	printf '%s\n' "$*"
}

# sys runs a system command, or prints it with --root (see DRY below).
sys() {
	if [ -n "$DRY" ]; then
		say "would run: $*"
	else
		"$@"
	fi
}

SERVER=
TOKEN=
DEVICE_ID=
FORCE=
BINARY=
DIST=
ROOT=
UNINSTALL=
PURGE=

need_arg() {
	[ "$2" -ge 2 ] || die "$1 needs a value"
}

while [ $# -gt 0 ]; do
	case "$1" in
	--server) need_arg "$1" $#; SERVER=$2; shift 2 ;;
	--server=*) SERVER=${1#*=}; shift ;;
	--token) need_arg "$1" $#; TOKEN=$2; shift 2 ;;
	--token=*) TOKEN=${1#*=}; shift ;;
	--id) need_arg "$1" $#; DEVICE_ID=$2; shift 2 ;;
	--id=*) DEVICE_ID=${1#*=}; shift ;;
	--binary) need_arg "$1" $#; BINARY=$2; shift 2 ;;
	--binary=*) BINARY=${1#*=}; shift ;;
	--dist) need_arg "$1" $#; DIST=$2; shift 2 ;;
	--dist=*) DIST=${1#*=}; shift ;;
	--root) need_arg "$1" $#; ROOT=$2; shift 2 ;;
	--root=*) ROOT=${1#*=}; shift ;;
	--force) FORCE=1; shift ;;
	--uninstall) UNINSTALL=1; shift ;;
	--purge) PURGE=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown option: $1" ;;
	esac
done

if [ -n "$PURGE" ] && [ -z "$UNINSTALL" ]; then
	# Going on to install would ignore it; deleting the identity is never a guess.
	die "--purge only goes with --uninstall (it deletes the device's identity); nothing done"
fi

if [ -n "$ROOT" ]; then
	mkdir -p "$ROOT" || die "cannot create $ROOT"
	ROOT=$(cd "$ROOT" && pwd) || die "bad --root $ROOT"
	[ "$ROOT" != / ] || ROOT=
fi
# DRY: print the system commands instead of running them.
DRY=
if [ -n "$ROOT" ] && [ "${RUN_SYSTEM_COMMANDS:-}" != 1 ]; then
	DRY=1
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
	die "run as root (sudo), or use --root DIR"
fi
# Checked before anything is installed: half an install helps no one.
if [ -z "$DRY" ] && ! command -v systemctl >/dev/null 2>&1; then
	die "systemd is needed (systemctl not found); nothing done"
fi
# systemctl is also found in containers, chroots and image builds, where
# systemd is not running and every systemctl call below would fail halfway.
# /run/systemd/system is how sd_booted(3) tells; with RUN_SYSTEM_COMMANDS=1
# it is looked for inside the root, where the fake commands act.
if [ -z "$DRY" ] && [ ! -d "$ROOT/run/systemd/system" ]; then
	die "systemd is not running here (no /run/systemd/system: a container or chroot?); nothing done. To prepare an image, use --root DIR"
fi

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)

# ---- uninstall -------------------------------------------------------------

if [ -n "$UNINSTALL" ]; then
	if [ -f "$ROOT$UNIT_PATH" ]; then
		sys systemctl disable --now "$NAME.service" || true
	fi
	rm -f "$ROOT$WANTS_DIR/$NAME.service" "$ROOT$UNIT_PATH" "$ROOT$BIN_PATH"
	sys systemctl daemon-reload
	if [ -n "$PURGE" ]; then
		rm -rf "$ROOT$STATE_PATH"
		if [ -n "$ROOT" ] || id -u "$AGENT_USER" >/dev/null 2>&1; then
			sys userdel "$AGENT_USER"
		fi
		say "device-agent removed, with its state and user"
	else
		say "device-agent removed; its identity is kept in $STATE_PATH (--purge deletes it)"
	fi
	exit 0
fi

# ---- pick the binary ---------------------------------------------------------

# UNAME_M overrides `uname -m`, for tests.
MACHINE=${UNAME_M:-$(uname -m)}
case "$MACHINE" in
armv6l) ARCH=armv6 ;;
armv7l | armv8l) ARCH=armv7 ;;
aarch64 | arm64) ARCH=arm64 ;;
x86_64 | amd64) ARCH=amd64 ;;
*) die "unsupported machine $MACHINE (want armv6l, armv7l, aarch64 or x86_64)" ;;
esac

[ -n "$DIST" ] || DIST=$SCRIPT_DIR
if [ -z "$BINARY" ]; then
	BINARY=$DIST/device-agent-linux-$ARCH
fi
[ -f "$BINARY" ] || die "no agent binary at $BINARY (build it with scripts/build-agent.sh)"
UNIT_SRC=$DIST/$NAME.service
[ -f "$UNIT_SRC" ] || UNIT_SRC=$SCRIPT_DIR/$NAME.service
[ -f "$UNIT_SRC" ] || die "no $NAME.service next to the binary or this script"

ENROLLED=
[ -f "$ROOT$STATE_PATH/cert.pem" ] && ENROLLED=1
ENROLL=
if [ -z "$ENROLLED" ] || [ -n "$FORCE" ]; then
	ENROLL=1
fi
# The token is read and required only when enrolling: the README's upgrade
# command (--token -) must work on an enrolled device with nothing on stdin.
if [ -n "$ENROLL" ]; then
	[ -n "$SERVER" ] || die "--server is required to enroll"
	if [ "$TOKEN" = - ]; then
		TOKEN=
		IFS= read -r TOKEN || [ -n "$TOKEN" ] || die "--token -: no token on stdin (paste it, then Enter)"
		[ -n "$TOKEN" ] || die "--token -: the token read from stdin is empty"
	fi
	[ -n "$TOKEN" ] || die "--token is required to enroll"
fi

# install_file SRC DEST MODE: copy through a temp file and rename, so a
# running binary or a reader never sees a half-written file.
install_file() {
	mkdir -p "$(dirname "$2")"
	cp "$1" "$2.tmp.$$"
	chmod "$3" "$2.tmp.$$"
	mv -f "$2.tmp.$$" "$2"
}

# ---- files, user, state folder -------------------------------------------------

install_file "$BINARY" "$ROOT$BIN_PATH" 0755
say "installed $BIN_PATH ($ARCH)"

if [ -n "$ROOT" ]; then
	sys useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$AGENT_USER"
elif ! id -u "$AGENT_USER" >/dev/null 2>&1; then
	if command -v useradd >/dev/null 2>&1; then
		useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$AGENT_USER"
	else
		adduser --system --group --no-create-home --home /nonexistent --shell /usr/sbin/nologin "$AGENT_USER"
	fi
	say "created system user $AGENT_USER"
fi

mkdir -p "$ROOT$STATE_PATH"
chmod 0700 "$ROOT$STATE_PATH"
sys chown "$AGENT_USER:$AGENT_USER" "$ROOT$STATE_PATH"

install_file "$UNIT_SRC" "$ROOT$UNIT_PATH" 0644
say "installed $UNIT_PATH"
sys systemctl daemon-reload

# ---- enrollment ------------------------------------------------------------------

# as_agent runs the agent binary as its user, the token on stdin (never in
# argv, where `ps` would show it).
as_agent() {
	if command -v runuser >/dev/null 2>&1; then
		printf '%s\n' "$TOKEN" | runuser -u "$AGENT_USER" -- "$@"
	else
		printf '%s\n' "$TOKEN" | su -s /bin/sh "$AGENT_USER" -c '"$0" "$@"' -- "$@"
	fi
}

if [ -z "$ENROLL" ]; then
	say "already enrolled; keeping the identity in $ROOT$STATE_PATH (--force enrolls again)"
else
	set -- "$BIN_PATH" enroll --state-dir "$STATE_PATH" --server "$SERVER" --token -
	[ -z "$DEVICE_ID" ] || set -- "$@" --id "$DEVICE_ID"
	[ -z "$FORCE" ] || set -- "$@" --force
	if [ -n "$DRY" ]; then
		say "would run as $AGENT_USER: $* (token on stdin)"
	else
		# enroll --force refuses while the agent runs. A failed enrollment
		# (a bad or expired token) changes nothing on disk, so the service
		# goes back to work with its old identity instead of leaving a
		# working device offline.
		WAS_UP=
		if [ -n "$FORCE" ]; then
			if systemctl is-active --quiet "$NAME.service" 2>/dev/null ||
				systemctl is-enabled --quiet "$NAME.service" 2>/dev/null; then
				WAS_UP=1
			fi
			systemctl stop "$NAME.service" 2>/dev/null || true
		fi
		if ! as_agent "$@"; then
			if [ -z "$WAS_UP" ]; then
				die "enrollment failed (see the message above)"
			fi
			if systemctl start "$NAME.service"; then
				die "enrollment failed (see the message above); the previous identity is kept and $NAME.service was started again with it"
			fi
			die "enrollment failed (see the message above), and starting $NAME.service again failed too: see systemctl status $NAME"
		fi
	fi
fi

# ---- enable and start ----------------------------------------------------------------

if [ -n "$DRY" ]; then
	# What `systemctl enable` does, inside the root.
	mkdir -p "$ROOT$WANTS_DIR"
	ln -sf "$UNIT_PATH" "$ROOT$WANTS_DIR/$NAME.service"
fi
sys systemctl enable "$NAME.service"
sys systemctl restart "$NAME.service"
if [ -n "$DRY" ]; then
	say "device-agent's files are laid out in $ROOT; nothing was run, neither the enrollment nor"
	say "systemctl: the \"would run\" lines are what an install on the device runs"
	exit 0
fi
say "device-agent is installed and running; check it with:"
say "  sudo -u $AGENT_USER $BIN_PATH status --state-dir $STATE_PATH"
say "  journalctl -u $NAME"
