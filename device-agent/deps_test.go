package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the agent light and the server side out of it, for the
// architecture it ships to first (a Pi Zero): no store, enroll, broker,
// mochi or bbolt, and no module outside a short allowlist.
func TestDeps(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	cmd := exec.Command(goBin, "list", "-deps", ".")
	cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH=arm", "GOARM=6", "CGO_ENABLED=0")
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("go list: %v\n%s", err, stderr)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 20 {
		t.Fatalf("go list returned only %d packages: %v", len(deps), deps)
	}
	forbidden := []string{
		"github.com/fleetmq/fleetmq/store",
		"github.com/fleetmq/fleetmq/enroll",
		"github.com/fleetmq/fleetmq/broker",
		"github.com/mochi-mqtt",
		"go.etcd.io/bbolt",
	}
	allowed := []string{
		"github.com/fleetmq/fleetmq/device-agent",
		"github.com/eclipse/paho.mqtt.golang",
		"github.com/gorilla/websocket", // paho's websocket transport
		"github.com/rs/zerolog",
		"github.com/mattn/go-isatty",    // zerolog
		"github.com/mattn/go-colorable", // zerolog
		"golang.org/x/",
	}
	sawPaho := false
	for _, p := range deps {
		for _, f := range forbidden {
			if p == f || strings.HasPrefix(p, f+"/") {
				t.Errorf("device-agent links %s (forbidden: %s)", p, f)
			}
		}
		first, _, _ := strings.Cut(p, "/")
		if !strings.Contains(first, ".") || strings.HasPrefix(p, "vendor/") {
			continue // standard library
		}
		ok := false
		for _, a := range allowed {
			if p == a || strings.HasPrefix(p, a) && (strings.HasSuffix(a, "/") || strings.HasPrefix(p, a+"/")) {
				ok = true
			}
		}
		if !ok {
			t.Errorf("device-agent links %s, which is not on the allowlist in deps_test.go", p)
		}
		sawPaho = sawPaho || p == "github.com/eclipse/paho.mqtt.golang"
	}
	if !sawPaho {
		t.Error("paho not in the dependency list: the check is not looking at the agent")
	}
}
