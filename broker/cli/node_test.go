package cli

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/server"
)

// startNode runs a real server on loopback ports in a temporary data
// folder, for the operator commands to talk to, and returns that folder.
func startNode(t *testing.T, mods ...func(*server.Config)) string {
	t.Helper()
	cfg := server.Config{
		DataDir:    filepath.Join(t.TempDir(), "data"),
		EnrollAddr: "127.0.0.1:0",
		MQTTAddr:   "127.0.0.1:0",
	}
	for _, m := range mods {
		m(&cfg)
	}
	srv, err := server.New(cfg)
	if err != nil {
		t.Fatalf("new server: %v", err)
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		t.Fatalf("start server: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close server: %v", err)
		}
	})
	return cfg.DataDir
}

// fleetmq runs the command line in-process, as the binary does, with
// FLEETMQ_DATA set to data ("" for none).
func fleetmq(t *testing.T, data string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errs bytes.Buffer
	code = Main(context.Background(), args, Env{
		Stdout: &out, Stderr: &errs,
		Getenv: func(k string) string {
			if k == "FLEETMQ_DATA" {
				return data
			}
			return ""
		},
	})
	return out.String(), errs.String(), code
}

// mustRun runs a command that must succeed and returns its stdout.
func mustRun(t *testing.T, data string, args ...string) string {
	t.Helper()
	out, errs, code := fleetmq(t, data, args...)
	if code != 0 {
		t.Fatalf("fleetmq %s: exit %d: %s", strings.Join(args, " "), code, errs)
	}
	return out
}
