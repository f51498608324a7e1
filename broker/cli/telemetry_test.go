package cli

import (
	"strings"
	"testing"
)

// An empty ID is a usage error, not a request for the endpoint's own path,
// which the server answered "no such admin endpoint".
func TestTelemetryEmptyID(t *testing.T) {
	data := startNode(t)
	out, errs, code := fleetmq(t, data, "telemetry", "")
	if code != 2 || out != "" || !strings.Contains(errs, "telemetry needs a device ID") {
		t.Fatalf("telemetry '': exit %d: %q %q", code, out, errs)
	}
}
