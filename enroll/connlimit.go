package enroll

import (
	"net"
	"sync"

	"github.com/fleetmq/fleetmq/enroll/peeraddr"
)

// LimitConnsPerAddress returns a listener that keeps at most n connections
// open from one remote address (one /64 for IPv6, as the failure limiter
// counts): a connection beyond that is closed as soon as it is accepted.
//
// A listener-wide cap alone (netutil.LimitListener) lets one client hold
// every slot with idle sockets it opens again as the server's handshake
// timeout drops them, which costs it no cryptography, and keep every
// device from enrolling and renewing. Closing the excess at once, rather
// than queueing it, also keeps that client's backlog from standing in
// front of everyone else's.
func LimitConnsPerAddress(ln net.Listener, n int) net.Listener {
	return &perAddrListener{Listener: ln, max: n, open: map[string]int{}}
}

type perAddrListener struct {
	net.Listener
	max int

	mu   sync.Mutex
	open map[string]int // limiterKey → connections open
}

func (l *perAddrListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		key := connKey(c)
		if l.take(key) {
			return &perAddrConn{Conn: c, release: func() { l.release(key) }}, nil
		}
		c.Close()
	}
}

func (l *perAddrListener) take(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[key] >= l.max {
		return false
	}
	l.open[key]++
	return true
}

func (l *perAddrListener) release(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[key]--; l.open[key] <= 0 {
		delete(l.open, key)
	}
}

func connKey(c net.Conn) string { return peeraddr.Key(c.RemoteAddr()) }

// perAddrConn gives its slot back on the first Close.
type perAddrConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *perAddrConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
