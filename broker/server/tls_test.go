package server_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// testsslFinding is one entry of testssl.sh's flat JSON output.
type testsslFinding struct {
	ID       string `json:"id"`
	Severity string `json:"severity"`
	Finding  string `json:"finding"`
}

// testsslExceptions are findings rated MEDIUM or worse that cannot apply to
// fleetmq, each with the reason. Anything else at MEDIUM or worse fails.
var testsslExceptions = map[string]string{
	"cert_expirationStatus": "the server certificate lives 7 days by design (ServerCertLifetime) and is renewed at two thirds of it, so it always 'expires < 30 days'",
	"cert_notAfter":         "same finding as cert_expirationStatus, reported as the date",
	"cert_revocation": "the server certificate carries no CRL or OCSP URI: it is short-lived, issued by the node's own CA that devices pin, " +
		"and replaced rather than revoked; a public revocation endpoint would serve nobody",
}

// runTestssl scans addr with testssl.sh and returns its findings. The
// checks are the ones that decide the posture: protocols (-p), cipher
// categories (-s), forward secrecy (-f), every cipher per protocol (-E),
// vulnerabilities (-U), certificate and server defaults (-S), and HTTP
// headers (-h) for HTTP. The fleet CA is added as a trust anchor, so the
// chain must verify. No DNS, no phoning out.
func runTestssl(tb testing.TB, addr, caFile string, http bool) []testsslFinding {
	tb.Helper()
	path, err := exec.LookPath("testssl")
	if err != nil {
		tb.Fatalf("testssl is not installed (scripts/test.sh installs the Debian package testssl.sh): %v", err)
	}
	out := filepath.Join(tb.TempDir(), "testssl.json")
	args := []string{"--quiet", "--color", "0", "--warnings", "off", "-n", "none",
		"--openssl-timeout", "10", "--connect-timeout", "10", "--add-ca", caFile,
		"-p", "-s", "-f", "-E", "-U", "-S", "--jsonfile", out}
	if http {
		args = append(args, "-h")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, append(args, addr)...)
	cmd.Dir = tb.TempDir()
	cmd.Env = append(os.Environ(), "TERM=dumb")
	text, runErr := cmd.CombinedOutput()
	// testssl's exit status counts findings; the JSON is what is judged.
	b, err := os.ReadFile(out)
	if err != nil {
		tb.Fatalf("testssl %s wrote no JSON (%v, %v):\n%s", addr, err, runErr, text)
	}
	var fs []testsslFinding
	if err := json.Unmarshal(b, &fs); err != nil {
		tb.Fatalf("testssl JSON: %v", err)
	}
	if testing.Verbose() {
		tb.Logf("testssl %s:\n%s", addr, text)
	}
	return fs
}

// checkTLSPosture judges one listener's testssl findings.
func checkTLSPosture(tb testing.TB, name string, fs []testsslFinding) {
	tb.Helper()
	byID := map[string]testsslFinding{}
	ciphers := 0
	for _, f := range fs {
		byID[f.ID] = f
		switch {
		case f.Severity == "FATAL" || f.ID == "scanProblem":
			tb.Errorf("%s: testssl could not scan: %s %s", name, f.ID, f.Finding)
		case strings.HasPrefix(f.ID, "cipher-"):
			// "TLS 1.2   xc02b   ECDHE-ECDSA-AES128-GCM-SHA256   ECDH 253   AESGCM   128   TLS_ECDHE_..."
			ciphers++
			fields := strings.Fields(f.Finding)
			if len(fields) < 7 {
				tb.Errorf("%s: cannot read cipher finding %q", name, f.Finding)
				continue
			}
			kx, enc := fields[4], fields[6]
			if !strings.Contains(kx, "DH") {
				tb.Errorf("%s: cipher without forward secrecy offered: %s", name, f.Finding)
			}
			if enc != "AESGCM" && enc != "ChaCha20" && enc != "AESCCM" {
				tb.Errorf("%s: non-AEAD cipher offered: %s", name, f.Finding)
			}
		}
		switch f.Severity {
		case "MEDIUM", "HIGH", "CRITICAL":
			if _, ok := testsslExceptions[f.ID]; !ok {
				tb.Errorf("%s: %s finding %s: %s", name, f.Severity, f.ID, f.Finding)
			}
		}
	}
	for _, p := range []string{"SSLv2", "SSLv3", "TLS1", "TLS1_1"} {
		if f, ok := byID[p]; !ok || !strings.HasPrefix(f.Finding, "not offered") {
			tb.Errorf("%s: %s: %q, want not offered", name, p, f.Finding)
		}
	}
	for _, p := range []string{"TLS1_2", "TLS1_3"} {
		if f := byID[p]; !strings.HasPrefix(f.Finding, "offered") {
			tb.Errorf("%s: %s: %q, want offered", name, p, f.Finding)
		}
	}
	for _, c := range []string{"cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"} {
		if f, ok := byID[c]; !ok || !strings.HasPrefix(f.Finding, "not offered") {
			tb.Errorf("%s: %s: %q, want not offered", name, c, f.Finding)
		}
	}
	if f := byID["cert_chain_of_trust"]; f.Severity != "OK" {
		tb.Errorf("%s: chain of trust to the fleet CA: %s %s", name, f.Severity, f.Finding)
	}
	if ciphers == 0 {
		tb.Errorf("%s: testssl found no cipher at all", name)
	}
}

// TestTLSPosture scans both TLS listeners of a node with testssl.sh, in
// parallel: no protocol below TLS 1.2, only forward-secret AEAD suites, no
// finding rated MEDIUM or worse but the documented exceptions.
func TestTLSPosture(t *testing.T) {
	if testing.Short() {
		t.Skip("testssl scans take about half a minute")
	}
	s := startServer(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, s.CA().ChainPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	// The group returns once its parallel scans have.
	t.Run("scan", func(t *testing.T) {
		for _, l := range []struct {
			name string
			addr string
			http bool
		}{
			{"enrollment HTTPS", s.EnrollAddr().String(), true},
			{"MQTT", s.MQTTAddr().String(), false},
		} {
			t.Run(l.name, func(t *testing.T) {
				t.Parallel()
				checkTLSPosture(t, l.name, runTestssl(t, l.addr, caFile, l.http))
			})
		}
	})
}

// TestMQTTRequiresClientCertificate: without a certificate, or with one
// another CA issued, the MQTT handshake fails, in TLS 1.2 and 1.3 alike;
// the fleet certificate gets through.
func TestMQTTRequiresClientCertificate(t *testing.T) {
	s := startServer(t)
	d := s.identity(t, "pi-tls", store.RoleDevice)
	other, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	key := newKey(t)
	foreign, err := other.IssueDevice(&key.PublicKey, "pi-tls", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	foreignCert := tls.Certificate{Certificate: [][]byte{foreign.Raw}, PrivateKey: key, Leaf: foreign}

	// handshake dials and, for TLS 1.3 where the client finishes first,
	// reads until the server's verdict arrives.
	handshake := func(version uint16, certs []tls.Certificate) error {
		cfg := s.mqttTLS(nil)
		cfg.MinVersion, cfg.MaxVersion, cfg.Certificates = version, version, certs
		c, err := tls.Dial("tcp", s.MQTTAddr().String(), cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write(connectPacket(t, "pi-tls", nil)); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 4)
		if _, err := c.Read(b); err != nil {
			return err
		}
		if b[0]>>4 != 2 || b[3] != 0 {
			return errors.New("CONNACK refused")
		}
		return nil
	}
	for _, v := range []struct {
		name    string
		version uint16
	}{{"TLS 1.2", tls.VersionTLS12}, {"TLS 1.3", tls.VersionTLS13}} {
		t.Run(v.name, func(t *testing.T) {
			if err := handshake(v.version, nil); err == nil || !strings.Contains(err.Error(), "tls:") {
				t.Errorf("without a certificate: %v, want a TLS alert", err)
			}
			if err := handshake(v.version, []tls.Certificate{foreignCert}); err == nil || !strings.Contains(err.Error(), "tls:") {
				t.Errorf("with another CA's certificate: %v, want a TLS alert", err)
			}
			if err := handshake(v.version, []tls.Certificate{*d.tlsCert()}); err != nil {
				t.Errorf("with the fleet certificate: %v", err)
			}
		})
	}
	// Nothing below TLS 1.2 is spoken at all.
	cfg := s.mqttTLS(d)
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	if c, err := tls.Dial("tcp", s.MQTTAddr().String(), cfg); err == nil {
		c.Close()
		t.Error("TLS 1.1 handshake succeeded")
	}
}
