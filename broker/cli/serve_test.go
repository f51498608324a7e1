package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
		{"--retention", "0"}, {"--cert-lifetime", "0s"}, {"--max-connections", "0"}, {"--handshake-timeout", "0s"},
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
