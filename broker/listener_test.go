package broker

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
)

// flakyListener fails Accept with an error while fails is positive.
type flakyListener struct {
	net.Listener
	fails atomic.Int64
	err   error
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, l.err
	}
	return l.Listener.Accept()
}

func listenLocal(tb testing.TB) net.Listener {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = ln.Close() })
	return ln
}

func dialLocal(tb testing.TB, addr net.Addr) net.Conn {
	tb.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

func TestGuardedListenerRetriesAcceptErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"EMFILE", &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}},
		{"ECONNABORTED", &net.OpError{Op: "accept", Net: "tcp", Err: syscall.ECONNABORTED}},
		{"unclassified", errors.New("something odd")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 5
			fl := &flakyListener{Listener: listenLocal(t), err: tc.err}
			fl.fails.Store(n)
			gl := newGuardedListener(fl, 10, 10, time.Second)
			var backoffs []time.Duration
			gl.onError = func(err error, backoff time.Duration) {
				if !errors.Is(err, tc.err) {
					t.Errorf("onError got %v, want %v", err, tc.err)
				}
				backoffs = append(backoffs, backoff)
			}
			dialLocal(t, fl.Addr())
			c, err := gl.Accept()
			if err != nil {
				t.Fatalf("Accept returned %v; it must retry", err)
			}
			defer c.Close()
			if len(backoffs) != n {
				t.Fatalf("retried %d times, want %d", len(backoffs), n)
			}
			want := minAcceptBackoff
			for i, b := range backoffs {
				if b != want {
					t.Errorf("backoff %d = %s, want %s", i, b, want)
				}
				want = min(2*want, maxAcceptBackoff)
			}
		})
	}
}

func TestGuardedListenerBackoffIsCapped(t *testing.T) {
	fl := &flakyListener{Listener: listenLocal(t), err: &net.OpError{Op: "accept", Err: syscall.ENFILE}}
	fl.fails.Store(1 << 40)
	gl := newGuardedListener(fl, 10, 10, time.Second)
	var seen []time.Duration
	capped := make(chan struct{})
	gl.onError = func(_ error, backoff time.Duration) {
		seen = append(seen, backoff)
		if backoff == maxAcceptBackoff {
			close(capped)
			// Skip the remaining real waits: the cap is what is tested.
			_ = gl.Close()
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := gl.Accept()
		done <- err
	}()
	receive(t, capped, "backoff to reach its cap")
	if err := receive(t, done, "Accept to return after Close"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close = %v, want net.ErrClosed", err)
	}
	for i := 1; i < len(seen); i++ {
		if seen[i] < seen[i-1] || seen[i] > maxAcceptBackoff {
			t.Fatalf("backoffs not increasing up to the cap: %v", seen)
		}
	}
}

func TestGuardedListenerCloseStopsBackoff(t *testing.T) {
	fl := &flakyListener{Listener: listenLocal(t), err: &net.OpError{Op: "accept", Err: syscall.EMFILE}}
	fl.fails.Store(1 << 40)
	gl := newGuardedListener(fl, 10, 10, time.Second)
	failing := make(chan struct{}, 1)
	gl.onError = func(error, time.Duration) {
		select {
		case failing <- struct{}{}:
		default:
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := gl.Accept()
		done <- err
	}()
	receive(t, failing, "a failing Accept")
	if err := gl.Close(); err != nil {
		t.Fatal(err)
	}
	if err := receive(t, done, "Accept to return after Close"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close = %v, want net.ErrClosed", err)
	}
	if err := gl.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestGuardedListenerDeadline(t *testing.T) {
	gl := newGuardedListener(listenLocal(t), 10, 10, 100*time.Millisecond)
	dialLocal(t, gl.Addr())
	c, err := gl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	_, err = c.Read(make([]byte, 1))
	if !isTimeout(err) {
		t.Fatalf("read of a silent socket = %v, want a timeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("deadline fired after %s", d)
	}
}

func TestGuardedListenerMaxConnections(t *testing.T) {
	gl := newGuardedListener(listenLocal(t), 2, 10, time.Minute)
	refused := make(chan struct{}, 10)
	gl.onRefuse = func() { refused <- struct{}{} }

	var open []net.Conn
	for range 2 {
		dialLocal(t, gl.Addr())
		c, err := gl.Accept()
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
	}
	if n := gl.open(); n != 2 {
		t.Fatalf("open = %d, want 2", n)
	}

	// Over the limit: closed at once, and Accept keeps waiting.
	extra := dialLocal(t, gl.Addr())
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := gl.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	receive(t, refused, "the extra socket to be refused")
	_ = extra.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := extra.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("refused socket read = %v, want EOF or reset", err)
	}

	// Closing one frees a slot; closing twice frees it once.
	_ = open[0].Close()
	_ = open[0].Close()
	if n := gl.open(); n != 1 {
		t.Fatalf("open after close = %d, want 1", n)
	}
	dialLocal(t, gl.Addr())
	c := receive(t, accepted, "a socket accepted in the freed slot")
	defer c.Close()
	if n := gl.open(); n != 2 {
		t.Fatalf("open = %d, want 2", n)
	}

	gl.closeConns()
	if n := gl.open(); n != 0 {
		t.Fatalf("open after closeConns = %d, want 0", n)
	}
	_ = gl.Close()
}

// dialerFrom dials from ip, another loopback address than the devices'
// 127.0.0.1: Linux routes all of 127/8 over loopback.
func dialerFrom(ip string) *net.Dialer {
	return &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: waitFor}
}

// dialIdleFrom opens n sockets from ip to addr that send nothing, closed
// at cleanup.
func dialIdleFrom(tb testing.TB, ip, addr string, n int) []net.Conn {
	tb.Helper()
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := dialerFrom(ip).Dial("tcp", addr)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = c.Close() })
		conns = append(conns, c)
	}
	return conns
}

// isClosedByPeer reports whether a read error means the server closed the
// socket.
func isClosedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

func TestGuardedListenerPendingPerAddress(t *testing.T) {
	gl := newGuardedListener(listenLocal(t), 10, 2, time.Minute)
	refused := make(chan string, 10)
	gl.onRefusePending = func(key string) { refused <- key }
	accept := func() *guardedConn {
		t.Helper()
		c, err := gl.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c.(*guardedConn)
	}
	dial := func(ip string) net.Conn {
		t.Helper()
		c, err := dialerFrom(ip).Dial("tcp", gl.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}

	dial("127.0.0.1")
	first := accept()
	dial("127.0.0.1")
	second := accept()

	// A third pending socket from that address is closed at once; another
	// address is not affected, and Accept returns it.
	extra := dial("127.0.0.1")
	dial("127.0.0.2")
	other := accept()
	if key := receive(t, refused, "the third socket from 127.0.0.1 refused"); key != "127.0.0.1" {
		t.Fatalf("refused key = %q, want 127.0.0.1", key)
	}
	_ = extra.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := extra.Read(make([]byte, 1)); !isClosedByPeer(err) {
		t.Fatalf("refused socket read = %v, want EOF or reset", err)
	}
	if k := peerKey(other); k != "127.0.0.2" {
		t.Fatalf("accepted %s, want the socket from 127.0.0.2", k)
	}

	// A connected socket no longer counts, also when it closes later;
	// connected and Close each count once.
	first.connected()
	first.connected()
	if n := gl.pendingFrom("127.0.0.1"); n != 1 {
		t.Fatalf("pending after connected = %d, want 1", n)
	}
	dial("127.0.0.1")
	third := accept()
	_ = first.Close()
	if n := gl.pendingFrom("127.0.0.1"); n != 2 {
		t.Fatalf("pending after closing the connected socket = %d, want 2", n)
	}
	_ = second.Close()
	_ = second.Close()
	_ = third.Close()
	_ = other.Close()
	gl.mu.Lock()
	left := len(gl.pending)
	gl.mu.Unlock()
	if left != 0 || gl.open() != 0 {
		t.Fatalf("after every close: %d addresses pending, %d open; want none", left, gl.open())
	}
	if len(refused) != 0 {
		t.Fatalf("%d more refusals, want none", len(refused))
	}
}

func peerKey(c net.Conn) string { return c.RemoteAddr().(*net.TCPAddr).IP.String() }

// TestPendingCapKeepsDevicesConnecting: one host opening as many idle
// sockets as --max-connections no longer locks every device out. Before
// the per-address cap, 200 idle sockets from 127.0.0.2 held every slot and
// a device from 127.0.0.1 was refused (EOF, max_connections).
func TestPendingCapKeepsDevicesConnecting(t *testing.T) {
	const maxConns, maxPending = 200, 20
	f := newFixture(t, func(c *Config) {
		c.MaxConnections = maxConns
		c.MaxPendingPerAddress = maxPending
		c.HandshakeTimeout = time.Minute
	})
	cert := f.device(t, "dev-a")
	idle := dialIdleFrom(t, "127.0.0.2", f.addr, maxConns)

	// Those past the cap are closed at once, not at the handshake
	// deadline a minute away; the others stay open until cleanup.
	closed := make(chan error, len(idle))
	for _, c := range idle {
		go func() {
			_, err := c.Read(make([]byte, 1))
			closed <- err
		}()
	}
	timeout := time.After(waitFor)
	for i := range maxConns - maxPending {
		select {
		case err := <-closed:
			if !isClosedByPeer(err) {
				t.Fatalf("idle socket %d: read = %v, want closed by the broker", i, err)
			}
		case <-timeout:
			t.Fatalf("%d of %d sockets past the cap closed within %s", i, maxConns-maxPending, waitFor)
		}
	}
	eventually(t, func() bool { return f.b.Stats().OpenConnections == maxPending }, "%d idle sockets open", maxPending)

	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)))
	if err := wait(t, d.Publish("devices/dev-a/telemetry", 1, false, "hello")); err != nil {
		t.Fatal(err)
	}
	s := f.b.Stats()
	if s.Refused[ReasonMaxPending] != maxConns-maxPending || s.Refused[ReasonMaxConnections] != 0 || s.OpenConnections != maxPending+1 {
		t.Fatalf("refused %v, open %d; want %d max_pending_per_address, none max_connections, %d open",
			s.Refused, s.OpenConnections, maxConns-maxPending, maxPending+1)
	}
	if n := strings.Count(f.logs.String(), "refusing connections from one address"); n != 1 {
		t.Errorf("the per-address refusal logged %d times for %d refusals, want once", n, maxConns-maxPending)
	}
}

// TestPendingCapReleasedAtEveryStage: a socket stops counting against its
// address however it ends before CONNECT is accepted (refused, handshake
// timed out or failed, closed, CONNECT timed out or refused) and when it
// is accepted: after all of them the address may again open the cap's
// worth.
func TestPendingCapReleasedAtEveryStage(t *testing.T) {
	const maxPending, from = 5, "127.0.0.3"
	f := newFixture(t, func(c *Config) {
		c.MaxPendingPerAddress = maxPending
		// Short, for the stages that wait for it, yet room for the
		// handshakes and CONNECTs that must succeed on a loaded machine.
		c.HandshakeTimeout = time.Second
	})
	cert := f.device(t, "dev-a")
	tlsFrom := func(cfg *tls.Config) *tls.Conn {
		t.Helper()
		c, err := tls.DialWithDialer(dialerFrom(from), "tcp", f.addr, cfg)
		if err != nil {
			t.Fatalf("tls dial: %v", err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	waitClosed := func(c net.Conn, what string) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(waitFor))
		if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Fatalf("%s: read = %v, want closed by the broker", what, err)
		}
	}
	idlePending := func() {
		t.Helper()
		eventually(t, func() bool { return f.b.ln.pendingFrom(from) == 0 }, "no socket from %s pending", from)
	}

	// Handshake timeouts, with refusals past the cap meanwhile.
	idle := dialIdleFrom(t, from, f.addr, maxPending+3)
	for i, c := range idle {
		waitClosed(c, fmt.Sprintf("idle socket %d", i))
	}
	idlePending()
	// Handshakes failed: no client certificate, or closed half-way.
	noCert := f.clientTLS(cert)
	noCert.Certificates = nil
	for range maxPending {
		c, err := dialerFrom(from).Dial("tcp", f.addr)
		if err != nil {
			t.Fatal(err)
		}
		tc := tls.Client(c, noCert)
		if err := tc.Handshake(); err == nil {
			waitClosed(tc, "socket without a certificate")
		}
		_ = tc.Close()
	}
	idlePending()
	// CONNECT never sent, or refused.
	var silent []net.Conn
	for range maxPending {
		silent = append(silent, tlsFrom(f.clientTLS(cert)))
	}
	for _, c := range silent {
		waitClosed(c, "socket without CONNECT")
	}
	for range maxPending {
		tc := tlsFrom(f.clientTLS(cert))
		r := &rawClient{tb: t, conn: tc, br: bufio.NewReader(tc), ver: 5}
		if ack := r.connect("not-dev-a"); ack.ReasonCode == packets.CodeSuccess.Code {
			t.Fatal("CONNECT with another client id accepted")
		}
		r.mustBeDisconnected("after a refused CONNECT")
	}
	idlePending()

	// A device connected from the address no longer counts.
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)).SetDialer(dialerFrom(from)))
	if n := f.b.ln.pendingFrom(from); n != 0 {
		t.Fatalf("pending with a device connected = %d, want 0", n)
	}

	refused := f.b.Stats().Refused[ReasonMaxPending]
	if refused == 0 {
		t.Fatal("no socket refused past the cap")
	}
	dialIdleFrom(t, from, f.addr, maxPending)
	eventually(t, func() bool { return f.b.ln.pendingFrom(from) == maxPending }, "%d sockets pending again", maxPending)
	if got := f.b.Stats().Refused[ReasonMaxPending]; got != refused {
		t.Fatalf("refusals went from %d to %d: the cap's worth is not free again", refused, got)
	}
	if !d.IsConnectionOpen() {
		t.Fatal("the connected device was closed")
	}
}

// TestSessionsFromOneAddressNotCapped: the cap counts only sockets not
// yet connected; a fleet behind one NAT holds any number of sessions.
func TestSessionsFromOneAddressNotCapped(t *testing.T) {
	const maxPending, devices = 5, 20
	f := newFixture(t, func(c *Config) { c.MaxPendingPerAddress = maxPending })
	clients := make([]paho.Client, devices)
	for i := range clients {
		id := fmt.Sprintf("dev-%02d", i)
		clients[i] = connect(t, f.pahoOpts(id, f.clientTLS(f.device(t, id))))
	}
	for i, c := range clients {
		if !c.IsConnectionOpen() {
			t.Fatalf("device %d disconnected", i)
		}
	}
	s := f.b.Stats()
	if s.Sessions != devices || s.Refused[ReasonMaxPending] != 0 || f.b.ln.pendingFrom("127.0.0.1") != 0 {
		t.Fatalf("sessions %d, refused %d, pending %d; want %d, 0, 0",
			s.Sessions, s.Refused[ReasonMaxPending], f.b.ln.pendingFrom("127.0.0.1"), devices)
	}
}
