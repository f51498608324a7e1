package server_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/store"
)

// TestSecondServerOnSameData: a second node on a data folder in use fails
// with a clear error (and no panic), and the first keeps serving.
func TestSecondServerOnSameData(t *testing.T) {
	s := startServer(t)
	cfg := s.cfg
	cfg.EnrollAddr, cfg.MQTTAddr = "127.0.0.1:0", "127.0.0.1:0"
	srv, err := server.New(cfg)
	if err == nil {
		srv.Close()
		t.Fatal("a second server opened a data folder in use")
	}
	if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("error %q does not say the database is held by another process", err)
	}
	if out, errs, code := s.cli(t, "ca", "show"); code != 0 {
		t.Fatalf("first server stopped answering: %s %s", out, errs)
	}
}
