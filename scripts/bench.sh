#!/usr/bin/env bash
# Side-by-side benchmark of fleetmq and mosquitto on this machine (issue 6):
# one PKI and one certificate per device for both, the same load generator
# (scripts/loadgen) against each in turn, and a table with ratios. A full
# run takes about three minutes on 2 cores and refreshes the section of
# BENCHMARKS.md between the bench.sh markers; the rest of that file is kept.
#
#   scripts/bench.sh                      full run, refreshes BENCHMARKS.md
#   scripts/bench.sh -rounds 3            more rounds (median); still refreshes
#   scripts/bench.sh -scenarios qos1,latency -devices 200
#                                         partial run: printed only
#   scripts/bench.sh -pprof-dir /tmp/prof -scenarios connect
#                                         with fleetmq CPU profiles (go tool pprof)
#
# It is not part of the test run (scripts/test.sh builds the load generator).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
fi
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)

bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/fleetmq" ./broker/cmd/fleetmq
go build -o "$bin/loadgen" ./scripts/loadgen

# 5,000 idle connections need as many sockets on each side, and the
# brokers inherit this limit.
want=16384
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  ulimit -Hn "$want" 2>/dev/null || want=$hard
fi
ulimit -Sn "$want" 2>/dev/null || true
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt 10240 ]; then
  echo "bench.sh: open file limit $(ulimit -Sn) is too low for 5,000 connections; run as root or raise it" >&2
  exit 1
fi

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev+changes"; fi
update=(-update BENCHMARKS.md)
for a in "$@"; do
  case "$a" in
    -rounds|--rounds|-rounds=*|--rounds=*|[0-9]*) ;;
    *) update=(); echo "bench.sh: partial run, BENCHMARKS.md left as it is" >&2; break ;;
  esac
done
"$bin/loadgen" -fleetmq "$bin/fleetmq" -mosquitto "$mosquitto_bin" \
  -command "scripts/bench.sh${*:+ $*} (fleetmq at $rev)" "${update[@]}" "$@"
