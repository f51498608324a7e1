package admin

import (
	"testing"
	"time"
)

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
