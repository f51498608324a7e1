package server_test

import (
	"io"
	"net/http"
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
		srv, err := server.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		err = srv.Start()
		if cerr := srv.Close(); cerr != nil {
			t.Errorf("close: %v", cerr)
		}
		if err == nil || !strings.Contains(err.Error(), "pprof") {
			t.Errorf("PprofAddr %q: start error %v, want a refusal", addr, err)
		}
	}
}
