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
}
