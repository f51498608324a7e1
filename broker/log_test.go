package broker

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"
)

func TestMochiLogger(t *testing.T) {
	pk := packets.Packet{TopicName: "devices/d1/telemetry", Payload: []byte(secretMarker)}
	tests := []struct {
		name    string
		level   zerolog.Level
		log     func(l *slog.Logger)
		want    []string // substrings of the output; none means no output
		wantNot []string
	}{
		{
			name:  "EOF warning dropped",
			level: zerolog.DebugLevel,
			log:   func(l *slog.Logger) { l.Warn("", "error", io.EOF) },
		},
		{
			name:  "wrapped EOF warning dropped",
			level: zerolog.DebugLevel,
			log: func(l *slog.Logger) {
				l.Warn("", "error", fmt.Errorf("read connection: %w", io.EOF))
			},
		},
		{
			name:  "packet dump stripped",
			level: zerolog.DebugLevel,
			log: func(l *slog.Logger) {
				l.Warn("error processing packet", "error", errors.New("boom"), "client", "d1", "pk", pk)
			},
			want:    []string{`"level":"warn"`, "error processing packet", "boom", `"client":"d1"`},
			wantNot: []string{secretMarker, `"pk"`},
		},
		{
			name:  "expected refusal lowered to debug",
			level: zerolog.DebugLevel,
			log: func(l *slog.Logger) {
				l.Error("publish packet error", "error", packets.ErrMessageRateTooHigh, "packet", pk)
			},
			want:    []string{`"level":"debug"`, "publish packet error"},
			wantNot: []string{secretMarker},
		},
		{
			name:  "lowered record hidden at info",
			level: zerolog.InfoLevel,
			log: func(l *slog.Logger) {
				l.Error("publish packet error", "error", packets.ErrMessageRateTooHigh, "packet", pk)
			},
		},
		{
			name:  "other records pass",
			level: zerolog.InfoLevel,
			log: func(l *slog.Logger) {
				l.Info("attached listener", "id", "mqtts")
			},
			want: []string{"attached listener", `"id":"mqtts"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf syncBuffer
			tt.log(newMochiLogger(zerolog.New(&buf).Level(tt.level)))
			out := buf.String()
			if len(tt.want) == 0 && out != "" {
				t.Fatalf("want no output, got %s", out)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output %s lacks %q", out, w)
				}
			}
			for _, w := range tt.wantNot {
				if strings.Contains(out, w) {
					t.Errorf("output %s contains %q", out, w)
				}
			}
		})
	}
}

func TestMochiLoggerWithAttrs(t *testing.T) {
	var buf syncBuffer
	l := newMochiLogger(zerolog.New(&buf)).With("packet", secretMarker, "hook", "x")
	l.Info("hello")
	out := buf.String()
	if strings.Contains(out, secretMarker) || !strings.Contains(out, `"hook":"x"`) {
		t.Fatalf("WithAttrs not filtered: %s", out)
	}
}
