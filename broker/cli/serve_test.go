package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/metrics/metricstest"
	"github.com/fleetmq/fleetmq/broker/server"
)

// A console log sent to a file or the journal must stay greppable: no
// colour escape codes unless the output is a terminal.
func TestConsoleLogWithoutTerminalHasNoColour(t *testing.T) {
	for _, format := range []string{"console", "json", "auto"} {
		var buf bytes.Buffer
		log, err := newLogger(&buf, "info", format, false)
		if err != nil {
			t.Fatal(err)
		}
		log.Info().Str("device", "pi-1").Msg("connected")
		out := buf.String()
		if strings.Contains(out, "\x1b[") {
			t.Errorf("%s: escape codes in %q", format, out)
		}
		if !strings.Contains(out, "connected") || !strings.Contains(out, "pi-1") {
			t.Errorf("%s: message lost: %q", format, out)
		}
	}
}

func TestLoggerRefusesUnknownSettings(t *testing.T) {
	var buf bytes.Buffer
	if _, err := newLogger(&buf, "loud", "json", false); err == nil || !strings.Contains(err.Error(), `"loud"`) {
		t.Errorf("level: %v", err)
	}
	if _, err := newLogger(&buf, "info", "xml", false); err == nil || !strings.Contains(err.Error(), `"xml"`) {
		t.Errorf("format: %v", err)
	}
}

// A zero would silently become the default: given on the command line it
// is refused before anything starts, or means none where none makes sense.
func TestServeRefusesZeroLimits(t *testing.T) {
	for _, args := range [][]string{
		{"--retention", "0"}, {"--cert-lifetime", "0s"}, {"--max-connections", "0"}, {"--max-pending-per-address", "0"}, {"--handshake-timeout", "0s"},
		{"--write-timeout", "0s"}, {"--max-packet-size", "0"}, {"--publish-rate", "0"}, {"--publish-burst", "-1"},
		{"--retention-count", "-5"},
	} {
		data := filepath.Join(t.TempDir(), "data")
		var out, errs bytes.Buffer
		code := Main(context.Background(), append([]string{"serve", "--data", data}, args...), Env{
			Stdout: &out, Stderr: &errs, Getenv: func(string) string { return "" },
		})
		if code != 2 || !strings.Contains(errs.String(), args[0]+" must be") {
			t.Errorf("%v: exit %d: %s", args, code, errs.String())
		}
		if _, err := os.Stat(data); !os.IsNotExist(err) {
			t.Errorf("%v: the data folder was created", args)
		}
	}
}

// A broker URL the device agent refuses would fail every enrollment, and
// only after its token was used: the server refuses it at start instead,
// before it creates anything.
func TestServeRefusesBrokerURLsDevicesRefuse(t *testing.T) {
	for _, bad := range []string{
		"mqtt://localhost:8883", "http://x", "tcp://gw.example.com:8883", "gw.example.com:8883",
		"mqtts://gw.example.com", "mqtts://:8883", "mqtts://gw.example.com:0", "mqtts://gw.example.com:70000",
	} {
		data := filepath.Join(t.TempDir(), "data")
		// Cancelled: a server that accepted the URL stops at once.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		var out, errs bytes.Buffer
		code := Main(ctx, []string{"serve", "--data", data, "--enroll-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0",
			"--metrics-addr", "off", "--ui-addr", "off", "--broker-url", bad}, Env{Stdout: &out, Stderr: &errs, Getenv: func(string) string { return "" }})
		if code != 2 || !strings.Contains(errs.String(), "--broker-url") || !strings.Contains(errs.String(), "mqtts://HOST:PORT") {
			t.Errorf("--broker-url %s: exit %d, want 2 (a usage error): %s", bad, code, errs.String())
		}
		if _, err := os.Stat(data); !os.IsNotExist(err) {
			t.Errorf("--broker-url %s: the data folder was created", bad)
		}
	}
	// The profiler's address is checked as early: exit 2, nothing created.
	for _, bad := range []string{"0.0.0.0:6060", ":6060", "10.0.0.2:6060", "127.0.0.1"} {
		data := filepath.Join(t.TempDir(), "data")
		var out, errs bytes.Buffer
		code := Main(context.Background(), []string{"serve", "--data", data, "--enroll-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0",
			"--metrics-addr", "off", "--ui-addr", "off", "--pprof-addr", bad}, Env{Stdout: &out, Stderr: &errs, Getenv: func(string) string { return "" }})
		if code != 2 || !strings.Contains(errs.String(), "--pprof-addr") {
			t.Errorf("--pprof-addr %s: exit %d, want 2: %s", bad, code, errs.String())
		}
		if _, err := os.Stat(data); !os.IsNotExist(err) {
			t.Errorf("--pprof-addr %s: the data folder was created", bad)
		}
	}
	for _, good := range []string{"mqtts://gw.example.com:8883", "ssl://10.0.0.2:8883", "tls://[::1]:8883", "tcps://gw:1"} {
		startNode(t, func(c *server.Config) { c.BrokerURL = good })
	}
}

// TestServeMaxPendingPerAddress runs `fleetmq serve` with
// --max-pending-per-address 3: a fourth idle MQTT socket from one address
// is closed at once (the handshake deadline is a minute away), counted in
// the metrics and logged.
func TestServeMaxPendingPerAddress(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	var code int
	exited := make(chan struct{}) // code is set once closed
	go func() {
		defer close(exited)
		code = Main(ctx, []string{"serve", "--data", filepath.Join(t.TempDir(), "data"),
			"--enroll-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--ui-addr", "off",
			"--log-format", "json", "--handshake-timeout", "1m", "--max-pending-per-address", "3"},
			Env{Stdout: io.Discard, Stderr: pw, Getenv: func(string) string { return "" }})
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		<-exited
		if code != 0 {
			t.Errorf("serve exited %d", code)
		}
	})
	type serving struct{ Message, MQTT, Metrics string }
	ready := make(chan serving, 1)
	refusalLogged := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		logged := false
		for sc.Scan() {
			var l serving
			if json.Unmarshal(sc.Bytes(), &l) == nil && l.Message == "fleetmq serving" {
				ready <- l
			}
			if !logged && strings.Contains(l.Message, "refusing connections from one address") {
				logged = true
				close(refusalLogged)
			}
		}
	}()
	var srv serving
	select {
	case srv = <-ready:
	case <-exited:
		t.Fatalf("serve exited %d before serving", code)
	case <-time.After(30 * time.Second):
		t.Fatal("not serving after 30s")
	}

	from := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 10 * time.Second}
	dial := func() net.Conn {
		t.Helper()
		c, err := from.Dial("tcp", srv.MQTT)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	for range 3 {
		dial()
	}
	// Accepted in order: the fourth is the one past the cap.
	extra := dial()
	_ = extra.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("fourth socket: read = %v, want closed at once", err)
	}
	metricstest.Scrape(t, srv.Metrics).Want(t, 1, "fleetmq_mqtt_connect_refusals_total", "reason", "max_pending_per_address")
	metricstest.Scrape(t, srv.Metrics).Want(t, 3, "fleetmq_mqtt_open_connections")
	select {
	case <-refusalLogged:
	case <-time.After(10 * time.Second):
		t.Fatal("the refusal was not logged")
	}
}
