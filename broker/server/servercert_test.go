package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// TestServerCertificateRenewsItself: with a 3 s server certificate, both
// TLS listeners present a new, valid certificate from the fleet CA after
// two thirds of it, without a restart.
func TestServerCertificateRenewsItself(t *testing.T) {
	s := startServer(t, func(c *server.Config) {
		c.ServerCertLifetime = 3 * time.Second
		c.Hostnames = []string{"fleet.example"}
	})
	leaf := func(addr net.Addr) *x509.Certificate {
		t.Helper()
		// Verification by the client checks the renewed certificate for
		// real: chain to the fleet CA, validity, SAN. Validity is checked
		// at the server's (test) clock, which issued it: NotAfter has
		// whole seconds, so at real time a 3 s certificate may be gone
		// after 2 s, as it was once in CI.
		conn, err := tls.Dial("tcp", addr.String(), &tls.Config{RootCAs: s.CA().Pool(), ServerName: "fleet.example", Time: s.clock.Now})
		if err != nil {
			t.Fatalf("handshake with %s: %v", addr, err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	first := leaf(s.EnrollAddr())
	deadline := time.Now().Add(15 * time.Second)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for leaf(s.EnrollAddr()).SerialNumber.Cmp(first.SerialNumber) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the enrollment listener still presents its first certificate after 15 s")
		}
		<-tick.C
	}
	// The MQTT listener shares it; its handshake fails later for want of a
	// client certificate, but the server's certificate is seen first.
	conn, err := net.Dial("tcp", s.MQTTAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var seen *x509.Certificate
	tc := tls.Client(conn, &tls.Config{RootCAs: s.CA().Pool(), ServerName: "fleet.example", Time: s.clock.Now,
		VerifyConnection: func(cs tls.ConnectionState) error { seen = cs.PeerCertificates[0]; return nil }})
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	tc.Handshake()
	if seen == nil || seen.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatalf("MQTT listener presents %v, want the renewed certificate", seen)
	}
}

// TestServerWarnsOfCAExpiry: a CA within 90 days of its end is named in a
// warning at start; a fresh one is not.
func TestServerWarnsOfCAExpiry(t *testing.T) {
	own := t.TempDir()
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: own})
	if err != nil {
		t.Fatal(err)
	}
	end := ca.Cert().NotAfter
	old := startServer(t, func(c *server.Config) {
		c.CACertFile, c.CAKeyFile = filepath.Join(own, "ca.pem"), filepath.Join(own, "ca.key")
		c.Now = func() time.Time { return end.Add(-20 * 24 * time.Hour) }
	})
	if logs := old.logs.String(); !strings.Contains(logs, `"level":"warn","ca_not_after":"`+end.UTC().Format(time.RFC3339)) ||
		!strings.Contains(logs, `"days_left":20,"message":"the fleet CA expires soon`) {
		t.Errorf("no warning of the CA's end in the log:\n%s", logs)
	}
	if fresh := startServer(t); strings.Contains(fresh.logs.String(), "the fleet CA") {
		t.Errorf("a new CA was warned about:\n%s", fresh.logs.String())
	}
}

// TestServerCertificateFollowsClockJumps: when the wall clock leaves the
// server certificate's validity (NTP setting a gateway's clock days ahead
// after fleetmq started, or back), the next handshake gets a certificate
// valid at the new time rather than the old one until the renewal timer.
func TestServerCertificateFollowsClockJumps(t *testing.T) {
	s := startServer(t)
	dial := func() (*x509.Certificate, error) {
		t.Helper()
		conn, err := tls.Dial("tcp", s.EnrollAddr().String(), &tls.Config{RootCAs: s.CA().Pool(), ServerName: "localhost", Time: s.clock.Now})
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0], nil
	}
	first, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	for _, jump := range []time.Duration{10 * 24 * time.Hour, -2 * time.Hour} {
		s.clock.Advance(jump)
		leaf, err := dial()
		if err != nil {
			t.Fatalf("handshake after the clock moved %s: %v", jump, err)
		}
		if leaf.SerialNumber.Cmp(first.SerialNumber) == 0 {
			t.Fatalf("after the clock moved %s: the same certificate", jump)
		}
		first = leaf
	}
}

// TestReadyzFailsOnceTheCAExpired: a node whose CA has expired can serve
// no TLS client, and /readyz says so.
func TestReadyzFailsOnceTheCAExpired(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.MetricsAddr = "127.0.0.1:0" })
	url := "http://" + s.MetricsAddr().String() + "/readyz"
	if code, body := getStatus(t, url); code != 200 {
		t.Fatalf("/readyz of a running node: %d %q", code, body)
	}
	s.clock.Advance(s.CA().Cert().NotAfter.Sub(s.clock.Now()))
	if code, body := getStatus(t, url); code != 503 || !strings.Contains(body, "the fleet CA expired at") {
		t.Errorf("/readyz once the CA expired: %d %q, want 503 naming the CA", code, body)
	}
}

// TestCAShowChainEnd: an operator CA under a root that ends first stops
// verifying with the root; `ca show` says so, as its own dates do not. The
// chain is made with openssl, as an operator would.
func TestCAShowChainEnd(t *testing.T) {
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	ext := "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
	if err := os.WriteFile(p("ca.ext"), []byte(ext), 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", p("root.key"), "-out", p("root.pem"), "-subj", "/CN=offline root", "-days", "400",
		"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
	run(t, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", p("ca.key"), "-out", p("ca.csr"), "-subj", "/CN=fleet intermediate")
	run(t, "openssl", "x509", "-req", "-in", p("ca.csr"), "-CA", p("root.pem"), "-CAkey", p("root.key"),
		"-days", "1825", "-extfile", p("ca.ext"), "-out", p("inter.pem"))
	run(t, "sh", "-c", `cat "$1/inter.pem" "$1/root.pem" > "$1/ca.pem" && chmod 600 "$1/ca.key"`, "sh", dir)
	rootEnd, err := time.Parse("Jan _2 15:04:05 2006 MST", strings.TrimPrefix(strings.TrimSpace(
		run(t, "openssl", "x509", "-in", p("root.pem"), "-noout", "-enddate")), "notAfter="))
	if err != nil {
		t.Fatal(err)
	}

	s := startServer(t, func(c *server.Config) { c.CACertFile, c.CAKeyFile = p("ca.pem"), p("ca.key") })
	out, errs, code := s.cli(t, "ca", "show")
	want := "chain ends  " + rootEnd.UTC().Format("2006-01-02 15:04:05 UTC")
	if code != 0 || !strings.Contains(out, want) {
		t.Errorf("ca show: %d, want %q in\n%s%s", code, want, out, errs)
	}
	out, _, _ = s.cli(t, "ca", "show", "--json")
	var info admin.CAInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil || !info.ChainNotAfter.Equal(rootEnd) {
		t.Errorf("ca show --json: chain_not_after %v, want %v (%v)", info.ChainNotAfter, rootEnd, err)
	}
	// A CA that is its own chain's end shows no such line.
	if out, _, _ := startServer(t).cli(t, "ca", "show"); strings.Contains(out, "chain ends") {
		t.Errorf("ca show of a generated CA:\n%s", out)
	}
}

// TestServedFleetCAWithoutCRLSign: an operator CA without key usage cRLSign
// is refused for a new fleet, but a fleet served with it before that was
// checked still starts after the upgrade (its devices work; only its CRL
// cannot be signed), and the log says what to fix.
func TestServedFleetCAWithoutCRLSign(t *testing.T) {
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	run(t, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", p("ca.key"), "-out", p("ca.pem"), "-subj", "/CN=old operator CA", "-days", "400",
		"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
	if err := os.Chmod(p("ca.key"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The fleet as an earlier fleetmq left it: a store bound to this CA.
	data := p("data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{CertFile: p("ca.pem"), KeyFile: p("ca.key"), MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	db, err := store.Open(filepath.Join(data, server.DBName), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.BindCA(context.Background(), ca.KeyID()); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	s := startServer(t, func(c *server.Config) { c.DataDir, c.CACertFile, c.CAKeyFile = data, p("ca.pem"), p("ca.key") })
	if logs := s.logs.String(); !strings.Contains(logs, `"level":"error","message":"the fleet CA may not sign CRLs (key usage cRLSign missing)`) {
		t.Errorf("no error about the CA in the log:\n%s", logs)
	}
	s.enroll(t, s.token(t, "--device", "pi-old"), "pi-old")
	resp, err := s.client(nil).Get(s.url("/v1/crl"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("GET /v1/crl: %s, want 503", resp.Status)
	}
	// A new fleet is refused the same CA.
	if _, err := server.New(server.Config{DataDir: p("new"), CACertFile: p("ca.pem"), CAKeyFile: p("ca.key")}); err == nil ||
		!strings.Contains(err.Error(), "cRLSign missing") {
		t.Errorf("a new fleet with the CA: %v", err)
	}
}
