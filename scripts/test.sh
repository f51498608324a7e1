#!/usr/bin/env bash
# Runs every fleetmq test. On a fresh Debian machine it first installs what
# the tests drive for real (mosquitto clients, openssl, curl, qemu for the ARM
# agent builds, testssl.sh, systemd-analyze, chromium for the dashboard)
# when missing.
#
#   scripts/test.sh            everything: vet, unit + end-to-end tests (race), fuzz smoke
#   FUZZTIME=30s scripts/test.sh   longer fuzzing
#   SKIP_FUZZ=1 scripts/test.sh    no fuzzing
#   FLEETMQ_SOAK=10s scripts/test.sh   shorter 2,000-device soak (TestSoak; default 60s, 10s with -short)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v qemu-arm-static >/dev/null || need+=(qemu-user-static)
command -v testssl >/dev/null || need+=(testssl.sh)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== gofmt, go vet"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then echo "gofmt needed: $unformatted"; exit 1; fi
go vet ./...

echo "== tests (race detector)"
go test -race -count=1 -timeout 12m ./...

if [ "${SKIP_FUZZ:-}" = "" ]; then
  echo "== fuzzing (${FUZZTIME:-10s} per target)"
  # Every Fuzz function of every package, each for a bounded time.
  for pkg in $(go list ./...); do
    dir=$(go list -f '{{.Dir}}' "$pkg")
    for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
      echo "-- $pkg $target"
      go test -run '^$' -fuzz "^${target}\$" -fuzztime "${FUZZTIME:-10s}" -fuzzminimizetime 2s "$pkg"
    done
  done
fi
echo "all tests passed"
