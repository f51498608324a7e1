package broker

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/rs/zerolog"
)

// redactedKeys are attributes mochi fills with whole packets or wills,
// payload included: they are dropped, never logged.
var redactedKeys = map[string]bool{
	"pk": true, "packet": true, "will": true, "payload": true,
}

// quietMessages are mochi messages logged at Warn or Error for events the
// broker expects and counts itself (its own refusals, short keepalives);
// they are lowered to Debug.
var quietMessages = map[string]bool{
	"publish packet error":           true,
	"publish packet rejected":        true,
	mqtt.ErrMinimumKeepalive.Error(): true,
	"client store quota reached":     true,
}

// newMochiLogger returns the slog logger given to mochi: zerolog underneath,
// with packet and payload attributes removed, mochi's EOF warning on every
// disconnect dropped and expected refusals lowered to Debug.
func newMochiLogger(l zerolog.Logger) *slog.Logger {
	return slog.New(&mochiHandler{next: zerolog.NewSlogHandler(l)})
}

type mochiHandler struct {
	next slog.Handler
}

func (h *mochiHandler) Enabled(ctx context.Context, level slog.Level) bool {
	// Records are only ever lowered, so a disabled level stays disabled.
	return h.next.Enabled(ctx, level)
}

func (h *mochiHandler) Handle(ctx context.Context, r slog.Record) error {
	level := r.Level
	if quietMessages[r.Message] {
		level = slog.LevelDebug
	}
	drop := false
	attrs := make([]slog.Attr, 0, r.NumAttrs())
	r.Attrs(func(a slog.Attr) bool {
		if redactedKeys[a.Key] {
			return true
		}
		if a.Key == "error" && level >= slog.LevelWarn && isEOF(a.Value) {
			drop = true
			return false
		}
		attrs = append(attrs, a)
		return true
	})
	if drop || !h.next.Enabled(ctx, level) {
		return nil
	}
	out := slog.NewRecord(r.Time, level, r.Message, r.PC)
	out.AddAttrs(attrs...)
	return h.next.Handle(ctx, out)
}

func (h *mochiHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	kept := make([]slog.Attr, 0, len(attrs))
	for _, a := range attrs {
		if !redactedKeys[a.Key] {
			kept = append(kept, a)
		}
	}
	return &mochiHandler{next: h.next.WithAttrs(kept)}
}

func (h *mochiHandler) WithGroup(name string) slog.Handler {
	return &mochiHandler{next: h.next.WithGroup(name)}
}

// isEOF reports whether an error attribute is a peer's plain hang-up.
func isEOF(v slog.Value) bool {
	v = v.Resolve()
	if v.Kind() != slog.KindAny {
		return false
	}
	switch e := v.Any().(type) {
	case error:
		return errors.Is(e, io.EOF) || strings.HasSuffix(e.Error(), io.EOF.Error())
	case string:
		return strings.HasSuffix(e, io.EOF.Error())
	}
	return false
}
