package cli

import (
	"bytes"
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
