package server_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/server"
)

const serverUnit = "../../scripts/fleetmq.service"

// TestServerUnitRuns runs the ExecStart line of scripts/fleetmq.service the
// way systemd would: STATE_DIRECTORY set, FLEETMQ_ARGS from the environment
// file split into words, no terminal, none of the caller's environment. The
// node keeps its data and admin socket in the state directory, answers the
// operator command the unit's comment gives, and stops cleanly on SIGTERM.
func TestServerUnitRuns(t *testing.T) {
	raw, err := os.ReadFile(serverUnit)
	if err != nil {
		t.Fatal(err)
	}
	var execStart string
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStart="); ok {
			execStart = v
		}
	}
	bin := buildFleetmq(t)
	state := filepath.Join(t.TempDir(), "fleetmq")
	if err := os.Mkdir(state, 0o700); err != nil { // systemd makes it (StateDirectory=)
		t.Fatal(err)
	}
	flags := "--enroll-addr 127.0.0.1:0 --mqtt-addr 127.0.0.1:0 --metrics-addr off --ui-addr off"
	var args []string
	for _, w := range strings.Fields(execStart) {
		switch w {
		case "/usr/local/bin/fleetmq":
			args = append(args, bin)
		case "${STATE_DIRECTORY}":
			args = append(args, state)
		case "$FLEETMQ_ARGS":
			args = append(args, strings.Fields(flags)...)
		default:
			if strings.Contains(w, "$") {
				t.Fatalf("ExecStart uses %s, which this test does not provide", w)
			}
			args = append(args, w)
		}
	}
	if len(args) < 2 || args[0] != bin {
		t.Fatalf("ExecStart=%q does not run /usr/local/bin/fleetmq", execStart)
	}
	env := []string{"STATE_DIRECTORY=" + state, "FLEETMQ_ARGS=" + flags, "PATH=/usr/bin:/bin"}
	n := runNode(t, args, env, state)

	cmd := exec.Command(bin, "device", "list")
	cmd.Env = []string{"FLEETMQ_DATA=" + state}
	if out, err := cmd.CombinedOutput(); err != nil || !strings.HasPrefix(string(out), "ID") {
		t.Fatalf("FLEETMQ_DATA=%s fleetmq device list: %v\n%s", state, err, out)
	}
	n.stop()
	for name, mode := range map[string]os.FileMode{server.DBName: 0o600, "ca.key": 0o600} {
		if fi, err := os.Stat(filepath.Join(state, name)); err != nil || fi.Mode() != mode {
			t.Errorf("%s in the state directory: %v %v, want mode %v", name, fi, err, mode)
		}
	}
}

// TestServerUnitVerifies: systemd-analyze accepts the unit (binary in
// place, against the system's units) and rates its exposure at most 2.0
// ("OK"; 10 is an unconfined service).
func TestServerUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (scripts/test.sh installs it)")
	}
	root := t.TempDir()
	for _, d := range []string{"usr/lib/systemd", "usr/local/bin", "etc/systemd/system"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("cp", "-a", "/usr/lib/systemd/system", filepath.Join(root, "usr/lib/systemd/")).CombinedOutput(); err != nil {
		t.Skipf("no system units to verify against: %v %s", err, out)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/local/bin/fleetmq"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(serverUnit)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/systemd/system/fleetmq.service"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command(analyze, "verify", "--man=no", "--root="+root, "/etc/systemd/system/fleetmq.service")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil || out.Len() > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out.String())
	}
	sec, err := exec.Command(analyze, "security", "--offline=true", "--root="+root, "/etc/systemd/system/fleetmq.service").CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for fleetmq.service: ([0-9.]+)`).FindSubmatch(sec)
	if m == nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, sec)
	}
	if score, _ := strconv.ParseFloat(string(m[1]), 64); score > 2.0 {
		t.Errorf("exposure %.1f, want at most 2.0:\n%s", score, sec)
	}
}
