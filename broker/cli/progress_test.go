package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestProgressOnlyOnATerminal(t *testing.T) {
	if p := newProgress(&bytes.Buffer{}, "x", 10); p != nil {
		t.Fatal("progress bar on a buffer")
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if p := newProgress(f, "x", 10); p != nil {
		t.Fatal("progress bar on a regular file")
	}
	var p *progress // what newProgress returns off a terminal: draws nothing
	p.set(3)
	p.finish()
}

func TestProgressLine(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := start.Add(2100 * time.Millisecond)
	var buf bytes.Buffer
	p := &progress{w: &buf, what: "minting tokens", total: 10000, start: start, now: func() time.Time { return now }, width: 10}
	for _, c := range []struct {
		done int
		want string
	}{
		{0, "minting tokens [>         ]     0/10000   0%  2.1s"},
		{4000, "minting tokens [====>     ]  4000/10000  40%  2.1s"},
		{10000, "minting tokens [==========] 10000/10000 100%  2.1s"},
		{12000, "minting tokens [==========] 10000/10000 100%  2.1s"},
	} {
		if got := p.line(c.done); got != c.want {
			t.Errorf("line(%d)\n got %q\nwant %q", c.done, got, c.want)
		}
	}
	p.set(5000)
	p.finish()
	if got, want := buf.String(), "\rminting tokens [=====>    ]  5000/10000  50%  2.1s\n"; got != want {
		t.Errorf("drawn %q, want %q", got, want)
	}
}
