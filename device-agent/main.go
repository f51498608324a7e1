// Command device-agent runs on every device of a fleetmq fleet: it enrolls
// with a bootstrap token, publishes telemetry over MQTT with mTLS, buffers it
// while offline and renews its certificate before it expires.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/fleetmq/fleetmq/device-agent/agent"
)

// version is stamped by scripts/build-agent.sh with -ldflags -X.
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := agent.Main(ctx, os.Args[1:], agent.Stdio{
		In:     os.Stdin,
		Out:    os.Stdout,
		Err:    os.Stderr,
		Getenv: os.Getenv,
	}, version)
	stop()
	os.Exit(code)
}
