package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"
)

func runMain(tb testing.TB, stdin string, env map[string]string, args ...string) (code int, stdout, stderr string) {
	tb.Helper()
	var out, errb bytes.Buffer
	code = Main(context.Background(), args, Stdio{
		In:     strings.NewReader(stdin),
		Out:    &out,
		Err:    &errb,
		Getenv: func(k string) string { return env[k] },
	}, "v9.9.9")
	return code, out.String(), errb.String()
}

func TestMainUsage(t *testing.T) {
	cases := []struct {
		args []string
		code int
	}{
		{nil, 2},
		{[]string{"bogus"}, 2},
		{[]string{"run", "--interval", "5ms"}, 2},
		{[]string{"run", "--interval", "48h"}, 2},
		{[]string{"status", "extra"}, 2},
		{[]string{"status", "--log-level", "loud"}, 2},
		{[]string{"enroll", "--server", "https://x"}, 2},
		{[]string{"help"}, 0},
	}
	for _, c := range cases {
		if code, _, _ := runMain(t, "", nil, c.args...); code != c.code {
			t.Errorf("%v: exit %d, want %d", c.args, code, c.code)
		}
	}
	// Each command's -h shows its own flags, not the list of commands.
	for cmd, flags := range map[string][]string{
		"enroll": {"-server URL", "-token token", "-id id", "-force", "-state-dir folder"},
		"run":    {"-interval period", "-state-dir folder", "-log-level level"},
		"status": {"-json", "-state-dir folder"},
		"renew":  {"-state-dir folder"},
	} {
		code, _, errOut := runMain(t, "", nil, cmd, "-h")
		if code != 0 || !strings.HasPrefix(errOut, "usage: device-agent "+cmd) || strings.Contains(errOut, "commands:") {
			t.Errorf("%s -h: exit %d\n%s", cmd, code, errOut)
		}
		for _, f := range flags {
			if !strings.Contains(errOut, f) {
				t.Errorf("%s -h lacks %q:\n%s", cmd, f, errOut)
			}
		}
	}
	if code, out, _ := runMain(t, "", nil, "version"); code != 0 || strings.TrimSpace(out) != "v9.9.9" {
		t.Errorf("version: %d %q", code, out)
	}
}

func TestMainEnrollStatusRenew(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	dir := t.TempDir()
	// The state folder comes from $STATE_DIRECTORY as under systemd, and
	// the token from stdin as the install script passes it.
	env := map[string]string{"STATE_DIRECTORY": dir}
	code, out, errOut := runMain(t, f.goodToken()+"\n", env, "enroll", "--server", f.srv.URL, "--token", "-", "--id", "pi-3")
	if code != 0 || !strings.Contains(out, "enrolled as pi-3") {
		t.Fatalf("enroll: %d %q %q", code, out, errOut)
	}
	if strings.Contains(out+errOut, f.secret) {
		t.Error("enroll printed the token")
	}
	code, out, _ = runMain(t, f.goodToken()+"\n", env, "enroll", "--server", f.srv.URL, "--token", "-")
	if code != 0 || !strings.Contains(out, "already enrolled as pi-3") {
		t.Errorf("second enroll: %d %q", code, out)
	}

	code, out, _ = runMain(t, "", nil, "status", "--state-dir", dir)
	if code != 0 || !strings.Contains(out, "pi-3") || !strings.Contains(out, "not running") || !strings.Contains(out, "last renewal: never") {
		t.Errorf("status: %d\n%s", code, out)
	}
	code, out, _ = runMain(t, "", env, "renew")
	if code != 0 || !strings.Contains(out, "renewed pi-3") {
		t.Errorf("renew: %d %q", code, out)
	}
	code, out, _ = runMain(t, "", env, "status", "--json")
	var s Status
	if err := json.Unmarshal([]byte(out), &s); code != 0 || err != nil {
		t.Fatalf("status --json: %d %v\n%s", code, err, out)
	}
	if !s.Enrolled || s.DeviceID != "pi-3" || s.Running || s.Connected || s.LastRenewal.IsZero() || s.ServerURL != f.srv.URL {
		t.Errorf("status %+v", s)
	}

	code, _, errOut = runMain(t, "nope\n", map[string]string{"STATE_DIRECTORY": t.TempDir()}, "enroll", "--server", f.srv.URL, "--token", "-")
	if code != 1 || !strings.Contains(errOut, "malformed token") {
		t.Errorf("bad token: %d %q", code, errOut)
	}
}

func TestStatusText(t *testing.T) {
	now := time.Date(2025, 5, 1, 12, 0, 0, 0, time.UTC)
	s := Status{
		Enrolled: true, DeviceID: "pi-1", Serial: "ab", NotAfter: now.Add(50 * time.Hour), Running: true,
		Condition: CondRevoked, LastError: "server answered 403 device_revoked", LastErrorAt: now.Add(-time.Hour),
		QueuePending: 12, QueueDropped: 3, QueueCounted: now.Add(-4 * time.Minute),
	}
	var b bytes.Buffer
	if err := s.WriteText(&b, now); err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"pi-1", "running, not connected", "(in 2d2h)", "12 pending, 3 dropped (counted 4m ago)", "enroll under a new id with a new token", "(1h0m ago)", "device_revoked"} {
		if !strings.Contains(b.String(), w) {
			t.Errorf("status text lacks %q:\n%s", w, b.String())
		}
	}
}

// Ctrl-C at the prompt of --token - ends enroll: main turns it into ctx,
// and a read of stdin alone would never see it (QA: SIGINT and SIGTERM
// both ignored until stdin closed).
func TestEnrollTokenPromptIsInterruptible(t *testing.T) {
	in, w := io.Pipe() // a terminal nobody types into
	defer w.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var errb bytes.Buffer
	code := make(chan int, 1)
	go func() {
		code <- Main(ctx, []string{"enroll", "--server", "https://127.0.0.1:1", "--token", "-", "--state-dir", t.TempDir()},
			Stdio{In: in, Out: io.Discard, Err: &errb}, "v9.9.9")
	}()
	cancel()
	select {
	case c := <-code:
		if c != 1 || !strings.Contains(errb.String(), "interrupted before a token was read") {
			t.Errorf("exit %d: %s", c, errb.String())
		}
	case <-time.After(waitLong):
		t.Fatal("enroll still waits for stdin after the interrupt")
	}
}
