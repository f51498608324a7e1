package enroll

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestLimitConnsPerAddress: from one address, connections beyond the cap
// are closed as soon as they are accepted; another address still gets in,
// and a slot freed by Close is taken again.
func TestLimitConnsPerAddress(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := LimitConnsPerAddress(inner, 2)
	t.Cleanup(func() { ln.Close() })
	dial := func(from string) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		c, err := d.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return c
	}
	accept := func() net.Conn {
		t.Helper()
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	var held []net.Conn
	for range 2 {
		dial("127.0.0.1")
		held = append(held, accept())
	}
	excess := dial("127.0.0.1")
	// Accept closes the excess connection and goes on to the next one,
	// from another address (Linux routes all of 127/8 to loopback).
	dial("127.0.0.2")
	if got := accept(); got.RemoteAddr().(*net.TCPAddr).IP.String() != "127.0.0.2" {
		t.Fatalf("accepted %v, want the connection from 127.0.0.2", got.RemoteAddr())
	}
	wantClosed(t, excess)

	held[0].Close()
	held[0].Close() // a second Close gives back nothing more
	dial("127.0.0.1")
	accept()
	// The cap holds again: 2 open from 127.0.0.1.
	over := dial("127.0.0.1")
	dial("127.0.0.2")
	accept()
	wantClosed(t, over)
}

// wantClosed checks that the server closed c without a byte.
func wantClosed(tb testing.TB, c net.Conn) {
	tb.Helper()
	n, err := c.Read(make([]byte, 1))
	if n != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		tb.Fatalf("read %d bytes, %v; want the connection closed by the server", n, err)
	}
}
