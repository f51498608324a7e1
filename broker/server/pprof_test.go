package server_test

import (
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/server"
)

func TestPprofIsOptInAndLoopbackOnly(t *testing.T) {
	off := startServer(t)
	if off.PprofAddr() != nil {
		t.Fatalf("pprof served by default on %s", off.PprofAddr())
	}

	on := startServer(t, func(c *server.Config) { c.PprofAddr = "127.0.0.1:0" })
	resp, err := http.Get("http://" + on.PprofAddr().String() + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "goroutine profile:") {
		t.Fatalf("goroutine profile: %s\n%.200s", resp.Status, body)
	}

	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:0", "example.com:0", "nonsense"} {
		cfg := server.Config{
			DataDir:    t.TempDir() + "/data",
			EnrollAddr: "127.0.0.1:0",
			MQTTAddr:   "127.0.0.1:0",
			PprofAddr:  addr,
		}
		// Refused by New, before the data folder is made.
		srv, err := server.New(cfg)
		if ce := (*server.ConfigError)(nil); !errors.As(err, &ce) || !strings.Contains(err.Error(), "pprof") {
			if srv != nil {
				srv.Close()
			}
			t.Errorf("PprofAddr %q: New error %v, want a refusal of the configuration", addr, err)
		}
		if _, err := os.Stat(cfg.DataDir); !os.IsNotExist(err) {
			t.Errorf("PprofAddr %q: the data folder was made", addr)
		}
	}
}
