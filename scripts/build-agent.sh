#!/bin/sh
# Build the device agent for every Raspberry Pi generation and amd64 into
# dist/, with the install script and the systemd unit next to the binaries:
# copying dist/ to a device is all an install needs.
#
#   scripts/build-agent.sh            # version from `git describe`, else "dev"
#   VERSION=v1.2.3 scripts/build-agent.sh
set -eu

cd "$(dirname "$0")/.."
DIST=${DIST:-dist}
if [ -z "${VERSION:-}" ]; then
	VERSION=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
fi
mkdir -p "$DIST"

# name GOARCH GOARM
for target in "armv6 arm 6" "armv7 arm 7" "arm64 arm64 " "amd64 amd64 "; do
	# shellcheck disable=SC2086 # word splitting is the point
	set -- $target
	out=$DIST/device-agent-linux-$1
	GOOS=linux GOARCH=$2 GOARM=${3:-} CGO_ENABLED=0 \
		go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o "$out" ./device-agent
done
cp scripts/install-agent.sh scripts/device-agent.service "$DIST/"

printf 'device-agent %s\n' "$VERSION"
for f in "$DIST"/device-agent-linux-*; do
	printf '%10d  %s\n' "$(wc -c <"$f")" "$f"
done
