package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
		if code == 0 || !strings.Contains(errs.String(), "--broker-url") || !strings.Contains(errs.String(), "mqtts://HOST:PORT") {
			t.Errorf("--broker-url %s: exit %d: %s", bad, code, errs.String())
		}
		if _, err := os.Stat(data); !os.IsNotExist(err) {
			t.Errorf("--broker-url %s: the data folder was created", bad)
		}
	}
	for _, good := range []string{"mqtts://gw.example.com:8883", "ssl://10.0.0.2:8883", "tls://[::1]:8883", "tcps://gw:1"} {
		startNode(t, func(c *server.Config) { c.BrokerURL = good })
	}
}
