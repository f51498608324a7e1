package server_test

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
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
