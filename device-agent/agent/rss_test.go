package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestAgentRSS measures the resident memory of the real binary publishing
// telemetry for DEVICE_AGENT_RSS_SECONDS seconds (the issue asks for 600,
// target ≤ 15 MB) against the fake server and a local broker. It is a
// measurement, not a check run by default.
func TestAgentRSS(t *testing.T) {
	secs, _ := strconv.Atoi(os.Getenv("DEVICE_AGENT_RSS_SECONDS"))
	if secs <= 0 {
		t.Skip("set DEVICE_AGENT_RSS_SECONDS to measure")
	}
	f := newFleet(t, time.Hour)
	bin := filepath.Join(t.TempDir(), "device-agent")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "run", "--state-dir", f.dir, "--interval", "1s", "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	f.brk.next(t, f.topic(topicTelemetry), waitLong)
	n := 1
	end := time.After(time.Duration(secs) * time.Second)
	for done := false; !done; {
		select {
		case m := <-f.brk.msgs:
			if m.topic == f.topic(topicTelemetry) {
				n++
			}
		case <-end:
			done = true
		}
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS") || strings.HasPrefix(line, "VmHWM") {
			t.Log(line)
		}
	}
	t.Logf("%d telemetry messages in %ds", n, secs)
}
