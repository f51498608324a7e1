package agent

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func validToken(tb testing.TB, fp [32]byte) string {
	tb.Helper()
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		tb.Fatal(err)
	}
	return "fmq1." + base64.RawURLEncoding.EncodeToString(secret) + "." + hex.EncodeToString(fp[:])
}

func TestParseToken(t *testing.T) {
	fp := sha256.Sum256([]byte("ca der"))
	good := validToken(t, fp)
	tok, err := parseToken(good)
	if err != nil {
		t.Fatalf("parseToken(valid): %v", err)
	}
	if tok.fingerprint != fp {
		t.Errorf("fingerprint = %x, want %x", tok.fingerprint, fp)
	}
	if tok.raw != good {
		t.Error("raw token not kept")
	}

	parts := strings.Split(good, ".")
	bad := map[string]string{
		"empty":            "",
		"wrong prefix":     "fmq2." + parts[1] + "." + parts[2],
		"two parts":        parts[0] + "." + parts[1],
		"four parts":       good + ".x",
		"short secret":     "fmq1." + parts[1][:42] + "." + parts[2],
		"padded secret":    "fmq1." + parts[1][:42] + "=." + parts[2],
		"std base64":       "fmq1." + strings.Repeat("+", 43) + "." + parts[2],
		"uppercase hex":    "fmq1." + parts[1] + "." + strings.ToUpper(parts[2]),
		"short hex":        "fmq1." + parts[1] + "." + parts[2][:63],
		"non-hex":          "fmq1." + parts[1] + "." + strings.Repeat("g", 64),
		"whitespace":       " " + good,
		"trailing newline": good + "\n",
	}
	for name, s := range bad {
		t.Run(name, func(t *testing.T) {
			_, err := parseToken(s)
			if !errors.Is(err, ErrTokenFormat) {
				t.Fatalf("parseToken = %v, want ErrTokenFormat", err)
			}
			if s != "" && strings.Contains(err.Error(), parts[1]) {
				t.Error("error message contains the secret")
			}
		})
	}
}

func FuzzParseToken(f *testing.F) {
	f.Add(validToken(f, sha256.Sum256(nil)))
	f.Add("fmq1..")
	f.Add("fmq1.a.b.c")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := parseToken(s)
		if err != nil {
			return
		}
		// Anything accepted must round-trip to the same fingerprint text.
		if got := s[len(s)-64:]; got != hex.EncodeToString(tok.fingerprint[:]) {
			t.Fatalf("fingerprint %x does not match %q", tok.fingerprint, got)
		}
	})
}
