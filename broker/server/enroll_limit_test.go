package server_test

import (
	"crypto/tls"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
)

// TestEnrollConnectionCap holds every enrollment connection slot with idle
// sockets: a further client waits (its handshake does not complete), and
// is served as soon as a slot frees up.
func TestEnrollConnectionCap(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.EnrollMaxConnections = 2 })
	tok := s.token(t)
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", s.EnrollAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		defer c.Close()
	}
	// Both slots are taken once the server has accepted both sockets; a
	// third handshake then cannot finish.
	probe, err := net.Dial("tcp", s.EnrollAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	probe.SetDeadline(time.Now().Add(500 * time.Millisecond))
	tc := tls.Client(probe, &tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1"})
	if err := tc.Handshake(); err == nil {
		t.Fatal("a third connection was served while the cap of 2 was held")
	}

	// The probe would take the freed slot until its handshake timed out.
	probe.Close()
	held[0].Close()
	a := s.post(t, s.client(nil), "/v1/enroll", bearer(tok), csrPEM(t, newKey(t), "capped-1"))
	if a.status != http.StatusCreated {
		t.Fatalf("enrollment after a slot freed: %d %s", a.status, a.body)
	}
}
