package enroll

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func randomFingerprint(tb testing.TB) [32]byte {
	tb.Helper()
	var fp [32]byte
	if _, err := rand.Read(fp[:]); err != nil {
		tb.Fatal(err)
	}
	return fp
}

func TestTokenRoundTrip(t *testing.T) {
	fp := randomFingerprint(t)
	tok, hash, err := NewToken(fp)
	if err != nil {
		t.Fatalf("NewToken: %v", err)
	}
	if len(tok) != 113 || !strings.HasPrefix(tok, "fmq1.") {
		t.Errorf("token has length %d and prefix %q, want 113 and fmq1.", len(tok), tok[:5])
	}
	parts := strings.Split(tok, ".")
	if len(parts) != 3 || len(parts[1]) != 43 || parts[2] != hex.EncodeToString(fp[:]) {
		t.Fatal("token is not fmq1.<43 chars>.<hex fingerprint>")
	}
	secret, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil || len(secret) != 32 {
		t.Fatalf("secret is not 32 bytes of base64url: %v", err)
	}
	if hash != sha256.Sum256(secret) {
		t.Error("hash is not SHA-256 of the secret bytes")
	}

	pt, err := ParseToken(tok)
	if err != nil {
		t.Fatalf("ParseToken: %v", err)
	}
	if pt.Hash != hash {
		t.Error("parsed hash differs from NewToken's")
	}
	if pt.CAFingerprint != fp {
		t.Error("fingerprint not carried")
	}

	id := TokenID(hash)
	if id != hex.EncodeToString(hash[:6]) || len(id) != 12 {
		t.Errorf("TokenID = %q, want hex of the first 6 hash bytes", id)
	}
	if strings.Contains(tok, id) {
		t.Error("token id appears in the token")
	}

	tok2, hash2, err := NewToken(fp)
	if err != nil {
		t.Fatal(err)
	}
	if tok2 == tok || hash2 == hash {
		t.Error("two tokens are equal")
	}
}

func TestTokenFingerprintMatchesOpenSSLForm(t *testing.T) {
	// The fingerprint part is what `openssl x509 -fingerprint -sha256`
	// prints, without colons and in lower case.
	ca := newTestCA(t, testNow)
	tok, _, err := NewToken(ca.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(ca.Cert().Raw)
	var colons []string
	for _, b := range sum {
		colons = append(colons, strings.ToUpper(hex.EncodeToString([]byte{b})))
	}
	opensslForm := strings.Join(colons, ":")
	if got := tok[strings.LastIndexByte(tok, '.')+1:]; got != strings.ToLower(strings.ReplaceAll(opensslForm, ":", "")) {
		t.Errorf("fingerprint part %s does not match openssl's %s", got, opensslForm)
	}
}

func TestParseTokenMalformed(t *testing.T) {
	fp := randomFingerprint(t)
	tok, _, err := NewToken(fp)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(tok, ".")
	secret, fpHex := parts[1], parts[2]
	short := base64.RawURLEncoding.EncodeToString(make([]byte, 31))
	long := base64.RawURLEncoding.EncodeToString(make([]byte, 33))
	// The last of 43 characters carries 4 data bits and 2 padding bits;
	// 'B' sets a padding bit, so the secret decodes to the same bytes as
	// 'A' but is a second spelling.
	nonCanonical := secret[:42] + "B"
	if strings.HasSuffix(secret, "B") {
		nonCanonical = secret[:42] + "C"
	}
	swap := func(s string, i int, c byte) string { b := []byte(s); b[i] = c; return string(b) }

	tests := []struct {
		name string
		in   string
	}{
		{"empty", ""},
		{"wrong prefix", "fmq2." + secret + "." + fpHex},
		{"upper-case prefix", "FMQ1." + secret + "." + fpHex},
		{"no prefix", secret + "." + fpHex},
		{"two parts", "fmq1." + secret + fpHex},
		{"four parts", "fmq1." + secret + "." + fpHex[:63] + "."},
		{"four parts, right length", "fmq1." + secret[:42] + "." + "." + fpHex},
		{"empty parts", "fmq1.." + secret + fpHex},
		{"bad base64 plus", "fmq1." + swap(secret, 3, '+') + "." + fpHex},
		{"bad base64 slash", "fmq1." + swap(secret, 3, '/') + "." + fpHex},
		{"bad base64 padding", "fmq1." + secret[:42] + "=" + "." + fpHex},
		{"newline in secret", "fmq1." + swap(secret, 10, '\n') + "." + fpHex},
		{"non-canonical base64", "fmq1." + nonCanonical + "." + fpHex},
		{"short secret", "fmq1." + short + "." + fpHex},
		{"long secret", "fmq1." + long + "." + fpHex},
		{"short secret, right length", "fmq1." + short + "." + fpHex + "a"},
		{"bad hex", "fmq1." + secret + "." + swap(fpHex, 5, 'g')},
		{"upper-case hex", "fmq1." + secret + "." + strings.ToUpper(fpHex)},
		{"short fingerprint", "fmq1." + secret + "." + fpHex[:62]},
		{"long fingerprint", "fmq1." + secret + "." + fpHex + "00"},
		{"leading space", " " + tok},
		{"trailing space", tok + " "},
		{"trailing newline", tok + "\n"},
		{"crlf", tok + "\r\n"},
		{"tab inside", "fmq1." + secret + ".\t" + fpHex[1:]},
		{"nul", tok[:112] + "\x00"},
		{"doubled", tok + tok},
		{"huge", strings.Repeat(tok, 1000)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pt, err := ParseToken(tt.in)
			if err == nil {
				t.Fatalf("accepted, hash %x", pt.Hash[:4])
			}
			var e *Error
			if !errors.As(err, &e) || e.Code != CodeTokenInvalid {
				t.Fatalf("err = %v, want code %s", err, CodeTokenInvalid)
			}
			if pt != (ParsedToken{}) {
				t.Error("non-zero ParsedToken returned with an error")
			}
			if leaks(err.Error(), tt.in) {
				t.Errorf("error %q contains token text", err)
			}
		})
	}
}

// leaks reports whether msg contains any 12-byte run of the token's secret
// or fingerprint, or the whole input.
func leaks(msg, in string) bool {
	if len(in) >= 5 && strings.Contains(msg, in) {
		return true
	}
	for _, part := range strings.Split(in, ".") {
		for i := 0; i+12 <= len(part); i++ {
			if strings.Contains(msg, part[i:i+12]) {
				return true
			}
		}
	}
	return false
}

func FuzzParseToken(f *testing.F) {
	var fp [32]byte
	for i := range fp {
		fp[i] = byte(i)
	}
	tok := formatToken(make([]byte, 32), fp)
	f.Add(tok)
	f.Add(formatToken([]byte(strings.Repeat("\xff", 32)), fp))
	f.Add("")
	f.Add("fmq1..")
	f.Add("fmq1." + strings.Repeat("A", 42) + "B." + strings.Repeat("0", 64))
	f.Add(strings.ToUpper(tok))
	f.Add(tok + "\n")
	f.Add(strings.Replace(tok, "AAAA", "AA\nA", 1))
	f.Fuzz(func(t *testing.T, s string) {
		pt, err := ParseToken(s)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Code != CodeTokenInvalid {
				t.Fatalf("err = %v, want code %s", err, CodeTokenInvalid)
			}
			if len(s) >= 20 && strings.Contains(err.Error(), s) {
				t.Fatalf("error contains the input")
			}
			return
		}
		parts := strings.Split(s, ".")
		if len(parts) != 3 {
			t.Fatalf("accepted a token with %d parts", len(parts))
		}
		secret, err := base64.RawURLEncoding.DecodeString(parts[1])
		if err != nil || len(secret) != 32 {
			t.Fatalf("accepted a secret that is not 32 bytes of base64url")
		}
		if pt.Hash != sha256.Sum256(secret) {
			t.Fatal("hash is not SHA-256 of the secret")
		}
		// Canonical: re-encoding what was parsed gives the input back.
		if again := formatToken(secret, pt.CAFingerprint); again != s {
			t.Fatalf("accepted a non-canonical token: re-encodes differently")
		}
	})
}
