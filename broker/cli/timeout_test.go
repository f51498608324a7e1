package cli

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// wedgedServer is a data folder whose admin socket accepts connections
// and never answers, as a server stuck in a deadlock or swamped does.
func wedgedServer(t *testing.T) string {
	t.Helper()
	data, ln := adminListener(t)
	held := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		close(held)
		for c := range held {
			c.Close()
		}
	})
	return data
}

// An operator command against a server that never answers gives up after
// --timeout and says so, and what to check; a change may have been made
// all the same. It waited forever.
func TestWedgedServerTimesOut(t *testing.T) {
	data := wedgedServer(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"device", "list"}, "the server did not answer within 100ms"},
		{[]string{"--timeout", "100ms", "token", "list"}, "give it longer with --timeout"},
		{[]string{"device", "revoke", "pi-7"}, "pi-7 may have been revoked all the same"},
	} {
		args := append(tc.args, "--data", data)
		if tc.args[0] != "--timeout" {
			args = append(args, "--timeout", "100ms")
		}
		_, errs, code := fleetmq(t, "", args...)
		if code != 1 || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d, want 1 and %q:\n%s", tc.args, code, tc.want, errs)
		}
	}
	if _, errs, code := fleetmq(t, data, "device", "list", "--timeout", "0"); code != 2 || !strings.Contains(errs, "--timeout must be more than 0") {
		t.Errorf("--timeout 0: exit %d: %s", code, errs)
	}
}

// A server whose accept queue is full does not take the connection (Linux
// refuses it at once): the request was not sent, and the error says that
// and what to check, not that a change may have been made.
func TestFullAcceptQueueTimesOut(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	// A backlog of 0 holds one connection, which nothing accepts.
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	sock := filepath.Join(data, admin.SocketName)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	first, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { first.Close() })
	_, errs, code := fleetmq(t, data, "device", "revoke", "pi-7", "--timeout", "100ms")
	if code != 1 || !strings.Contains(errs, "the server is not taking connections") || strings.Contains(errs, "all the same") {
		t.Errorf("exit %d: %s", code, errs)
	}
}

// The timeout bounds the wait for an answer to start, not the answer: a
// followed telemetry stream stays open well past it.
func TestFollowOutlivesTheTimeout(t *testing.T) {
	data := startNode(t)
	mustRun(t, data, "service", "issue", "watcher", "--out", t.TempDir())
	const timeout = 50 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*timeout)
	defer cancel()
	var out, errs bytes.Buffer
	code := Main(ctx, []string{"telemetry", "watcher", "--follow", "--timeout", timeout.String(), "--data", data},
		Env{Stdout: &out, Stderr: &errs, Getenv: func(string) string { return "" }})
	if code != 0 || ctx.Err() == nil {
		t.Fatalf("telemetry --follow ended before it was stopped: exit %d: %s", code, errs.String())
	}
}
