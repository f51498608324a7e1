package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestQemu runs the armv7 and arm64 builds under qemu-user (Debian
// qemu-user-static): the stamped binary itself, and the agent package's
// tests (queue, identity, enrollment against a fake server, MQTT session
// against a broker) compiled for the architecture. The end-to-end run
// against the real server is left to the server's test suite.
func TestQemu(t *testing.T) {
	if testing.Short() {
		t.Skip("builds for two architectures; skipped with -short")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	targets := []struct{ name, goarch, goarm, qemu string }{
		{"armv7", "arm", "7", "qemu-arm-static"},
		{"arm64", "arm64", "", "qemu-aarch64-static"},
	}
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			qemu, err := exec.LookPath(tg.qemu)
			if err != nil {
				t.Skipf("%s not installed", tg.qemu)
			}
			dir := t.TempDir()
			env := append(os.Environ(), "GOOS=linux", "GOARCH="+tg.goarch, "GOARM="+tg.goarm, "CGO_ENABLED=0")
			bin := filepath.Join(dir, "device-agent")
			build := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w -X main.version=qemu-"+tg.name, "-o", bin, ".")
			build.Env = env
			if out, err := build.CombinedOutput(); err != nil {
				t.Fatalf("build: %v\n%s", err, out)
			}
			run := func(wantCode int, args ...string) string {
				t.Helper()
				out, err := exec.Command(qemu, append([]string{bin}, args...)...).CombinedOutput()
				if code := exitCode(err); code != wantCode {
					t.Fatalf("%s %v: %v, want exit %d\n%s", tg.name, args, err, wantCode, out)
				}
				return string(out)
			}
			if out := run(0, "version"); strings.TrimSpace(out) != "qemu-"+tg.name {
				t.Errorf("version = %q, want the stamped qemu-%s", out, tg.name)
			}
			// 3: not enrolled.
			if out := run(3, "status", "--state-dir", filepath.Join(dir, "state")); !strings.Contains(out, "not enrolled") {
				t.Errorf("status = %q", out)
			}

			testBin := filepath.Join(dir, "agent.test")
			build = exec.Command(goBin, "test", "-c", "-o", testBin, "./agent")
			build.Env = env
			if out, err := build.CombinedOutput(); err != nil {
				t.Fatalf("build tests: %v\n%s", err, out)
			}
			cmd := exec.Command(qemu, testBin, "-test.run", "Queue|Identity|Atomic|Enroll|Renew|Sample|TestRunPublishes|TestRunBuffers")
			cmd.Dir = "agent"
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("agent tests under %s: %v\n%s", tg.qemu, err, out)
			}
		})
	}
}

// exitCode is the exit code of a finished command: 0 for no error, -1 if
// it did not run to an exit.
func exitCode(err error) int {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	return -1
}
