package admin

import (
	"testing"
	"time"
)

// --since takes what the CLI prints in its tables (telemetry with
// milliseconds), so a time can be copied from one command to the next,
// besides durations and RFC 3339; a time without its zone is refused
// rather than guessed.
func TestParseSince(t *testing.T) {
	now := time.Date(2026, 12, 7, 21, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Time
		ok   bool
	}{
		{"2026-12-07 20:26:32 UTC", time.Date(2026, 12, 7, 20, 26, 32, 0, time.UTC), true},
		{"2026-12-07 20:26:32.123 UTC", time.Date(2026, 12, 7, 20, 26, 32, 123e6, time.UTC), true},
		{"2026-12-07T20:26:32Z", time.Date(2026, 12, 7, 20, 26, 32, 0, time.UTC), true},
		{"2026-12-07T21:26:32+01:00", time.Date(2026, 12, 7, 20, 26, 32, 0, time.UTC), true},
		{"1h", now.Add(-time.Hour), true},
		{"7d", now.Add(-7 * 24 * time.Hour), true},
		{"", time.Time{}, true},
		{"2026-12-07 20:26:32", time.Time{}, false},
		{"2026-12-07 20:26:32 CET", time.Time{}, false},
		{"yesterday", time.Time{}, false},
		{"-1h", time.Time{}, false},
	} {
		got, err := parseSince(tc.in, now)
		if (err == nil) != tc.ok || !got.Equal(tc.want) {
			t.Errorf("parseSince(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"90s", 90 * time.Second, true},
		{"12h", 12 * time.Hour, true},
		{"7d", 7 * 24 * time.Hour, true},
		{"1.5d", 36 * time.Hour, true},
		{"-1h", -time.Hour, true}, // callers decide whether negative makes sense
		{"0d", 0, true},
		{"", 0, false},
		{"d", 0, false},
		{"7", 0, false},
		{"NaNd", 0, false},
		{"Infd", 0, false},
		{"-Infd", 0, false},
		{"99999999d", 0, false}, // would wrap around to a negative
		{"-99999999d", 0, false},
		{"99999999999h", 0, false},
		{"1x", 0, false},
	} {
		got, err := ParseDuration(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}
