package agent

import (
	"testing"
	"time"
)

func TestHuman(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-5 * time.Second:                   "5s ago",
		0:                                  "in 0s",
		42 * time.Second:                   "in 42s",
		-90 * time.Minute:                  "1h30m ago",
		30*24*time.Hour + 2*time.Hour:      "in 30d2h",
		-(3*24*time.Hour + 59*time.Minute): "3d0h ago",
	} {
		if got := human(d); got != want {
			t.Errorf("human(%v) = %q, want %q", d, got, want)
		}
	}
}
