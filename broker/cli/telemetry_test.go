package cli

import (
	"strings"
	"testing"
)

// An empty or all-dots ID is a usage error, not a request for the
// endpoint's own path, which the server answered "no such admin endpoint".
func TestTelemetryEmptyID(t *testing.T) {
	data := startNode(t)
	for _, id := range []string{"", ".", ".."} {
		out, errs, code := fleetmq(t, data, "telemetry", id)
		if code != 2 || out != "" || !strings.Contains(errs, "is not an ID; `fleetmq device list` shows the ids") {
			t.Errorf("telemetry %q: exit %d: %q %q", id, code, out, errs)
		}
	}
}
