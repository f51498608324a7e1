package server_test

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"syscall"
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

// TestEnrollConnectionsPerAddress: one address holding its share of the
// enrollment connections with idle sockets has any further one closed at
// once, and leaves the other slots to everyone else: a device from another
// address enrolls.
func TestEnrollConnectionsPerAddress(t *testing.T) {
	s := startServer(t, func(c *server.Config) {
		c.EnrollMaxConnections = 4
		c.EnrollMaxConnectionsPerAddress = 2
	})
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", s.EnrollAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(5 * time.Second))
		return c
	}
	dial()
	dial()
	// Accepted in order: the third from 127.0.0.1 is over its share.
	if n, err := dial().Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("third idle connection from one address: read %d, %v; want it closed by the server", n, err)
	}
	// Linux routes all of 127/8 to loopback: a device at another address.
	c := s.client(nil)
	c.Transport.(*http.Transport).DialContext = (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).DialContext
	a := s.post(t, c, "/v1/enroll", bearer(s.token(t)), csrPEM(t, newKey(t), "per-address-1"))
	if a.status != http.StatusCreated {
		t.Fatalf("enrollment from another address: %d %s", a.status, a.body)
	}
}
