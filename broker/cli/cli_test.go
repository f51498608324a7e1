package cli

import (
	"io"
	"slices"
	"testing"
)

// Positional arguments may come before, between or after flags; whether a
// flag swallows the next argument is the flag set's answer, so a boolean
// flag never takes the name that follows it.
func TestInterleave(t *testing.T) {
	fs := newFlags("service issue", Env{Stdout: io.Discard, Stderr: io.Discard, Getenv: func(string) string { return "" }})
	out := fs.String("out", ".", "")
	renew := fs.Bool("renew", false, "")
	for _, args := range [][]string{
		{"backend", "--renew", "--out", "d"},
		{"--renew", "backend", "--out", "d"},
		{"--out", "d", "backend", "--renew"},
		{"--out=d", "--renew", "--json", "backend"},
		{"-renew", "backend", "-out", "d"},
	} {
		*out, *renew, *fs.json = ".", false, false
		if err := fs.parse(args, 1); err != nil {
			t.Errorf("%q: %v", args, err)
			continue
		}
		if fs.Arg(0) != "backend" || *out != "d" || !*renew {
			t.Errorf("%q: name %q, --out %q, --renew %v (as parsed: %q)", args, fs.Arg(0), *out, *renew, fs.interleave(args))
		}
		if slices.Contains(args, "--json") && !*fs.json {
			t.Errorf("%q: --json lost", args)
		}
	}
	// After "--" everything is an argument, even what looks like a flag.
	for _, tc := range []struct {
		args, pos []string
		renew     bool
	}{
		{[]string{"--renew", "--", "-backend"}, []string{"-backend"}, true},
		{[]string{"--", "-backend", "--renew"}, []string{"-backend", "--renew"}, false},
	} {
		*renew = false
		if err := fs.parse(tc.args, len(tc.pos)); err != nil {
			t.Errorf("%q: %v", tc.args, err)
			continue
		}
		if !slices.Equal(fs.Args(), tc.pos) || *renew != tc.renew {
			t.Errorf("%q: arguments %q, --renew %v", tc.args, fs.Args(), *renew)
		}
	}
}

// The shared flags before the command go before a "--", not after it,
// where they would be arguments: `fleetmq --data D device show -- ID`.
func TestCommandFirstBeforeDoubleDash(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"--data", "d", "device", "show", "pi-1"}, []string{"device", "show", "pi-1", "--data", "d"}},
		{[]string{"--data", "d", "--json", "device", "show", "--", "pi-1"}, []string{"device", "show", "--data", "d", "--json", "--", "pi-1"}},
	} {
		if got := commandFirst(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("%q: %q, want %q", tc.in, got, tc.want)
		}
	}
}
