package server_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// run runs an external command and fails the test with its output on error.
func run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		tb.Fatalf("%s is not installed (scripts/test.sh installs it): %v", name, err)
	}
	out, err := exec.Command(path, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestEnrollWithOpenSSLAndCurl is the README walkthrough with real tools:
// openssl makes the key and CSR, curl enrolls with the token, and openssl
// verifies the answer against the CA served by /v1/ca.
func TestEnrollWithOpenSSLAndCurl(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	tok := s.token(t, "--device", "curl-pi")

	// Pin on first contact: fetch the CA without trust, then compare its
	// fingerprint with the one the token carries.
	run(t, "curl", "-sSf", "-k", "-o", p("ca.pem"), s.url("/v1/ca"))
	// As the README has it: openssl x509 -in ca.pem -outform der | sha256sum
	sum := run(t, "sh", "-c", `openssl x509 -in "$1" -outform der | sha256sum`, "sh", p("ca.pem"))
	fp, _, _ := strings.Cut(strings.TrimSpace(sum), " ")
	if !strings.HasSuffix(tok, "."+fp) {
		t.Fatalf("token does not carry the CA fingerprint %s", fp)
	}

	run(t, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", p("device.key"), "-out", p("device.csr"), "-subj", "/CN=curl-pi")
	run(t, "curl", "-sSf", "--cacert", p("ca.pem"),
		"-H", "Authorization: Bearer "+tok, "-H", "Content-Type: application/pkcs10", "-H", "Accept: application/x-pem-file",
		"--data-binary", "@"+p("device.csr"), "-o", p("device.pem"), s.url("/v1/enroll"))
	out := run(t, "openssl", "verify", "-CAfile", p("ca.pem"), "-purpose", "sslclient", p("device.pem"))
	if !strings.Contains(out, "OK") {
		t.Fatalf("openssl verify: %s", out)
	}
	subj := run(t, "openssl", "x509", "-in", p("device.pem"), "-noout", "-subject")
	if !strings.Contains(subj, "CN = curl-pi") && !strings.Contains(subj, "CN=curl-pi") {
		t.Fatalf("subject %s", subj)
	}

	// Renewal with curl's --cert/--key.
	run(t, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", p("new.key"), "-out", p("new.csr"), "-subj", "/CN=curl-pi")
	run(t, "curl", "-sSf", "--cacert", p("ca.pem"), "--cert", p("device.pem"), "--key", p("device.key"),
		"-H", "Content-Type: application/pkcs10", "-H", "Accept: application/x-pem-file",
		"--data-binary", "@"+p("new.csr"), "-o", p("new.pem"), s.url("/v1/renew"))
	run(t, "openssl", "verify", "-CAfile", p("ca.pem"), p("new.pem"))

	// The CRL is a DER CRL openssl reads and checks against the CA.
	run(t, "curl", "-sSf", "--cacert", p("ca.pem"), "-o", p("crl.der"), s.url("/v1/crl"))
	run(t, "openssl", "crl", "-inform", "DER", "-in", p("crl.der"), "-CAfile", p("ca.pem"), "-noout")

	if fi, err := os.Stat(filepath.Join(s.cfg.DataDir, "ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("ca.key mode: %v %v", fi.Mode(), err)
	}
}
