package broker

import (
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
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
			gl := newGuardedListener(fl, 10, time.Second)
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
	gl := newGuardedListener(fl, 10, time.Second)
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
	gl := newGuardedListener(fl, 10, time.Second)
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
	gl := newGuardedListener(listenLocal(t), 10, 100*time.Millisecond)
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
	gl := newGuardedListener(listenLocal(t), 2, time.Minute)
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
