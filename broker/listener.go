package broker

import (
	"errors"
	"math"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/fleetmq/fleetmq/enroll/peeraddr"
)

// Accept backoff bounds: long enough not to spin while the process is out of
// file descriptors, short enough to recover quickly once some are freed.
const (
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// Descriptors the broker leaves to the rest of the process: the store, the
// other listeners and what they accept (enrollment, the admin socket,
// metrics). A quarter of the limit, and at least minFDReserve.
const minFDReserve = 32

// fdConnectionCap returns the most MQTT sockets a process allowed nofile
// open files can hold while keeping descriptors for the rest of the
// server. Past its limit the process fails every accept and every open:
// the operator CLI and enrollment would starve as well as devices.
func fdConnectionCap(nofile uint64) int {
	reserve := max(nofile/4, minFDReserve)
	if nofile <= reserve {
		return 1
	}
	return int(min(nofile-reserve, math.MaxInt32))
}

// openFileLimit returns the process's limit on open files (RLIMIT_NOFILE,
// which Go raises to the hard limit at start), or 0 if unknown.
func openFileLimit() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur == ^uint64(0) /* RLIM_INFINITY */ {
		return 0
	}
	return lim.Cur
}

// logEvery lets a repeated log line through at most once per period, and
// counts the occurrences it held back meanwhile: a condition that lasts
// (out of descriptors, at the connection limit) must not write a line per
// socket, which on an SD card or in the journal would be the next problem.
type logEvery struct {
	period time.Duration
	mu     sync.Mutex
	last   time.Time // when a line was last let through; zero before the first
	held   int
}

// allow reports whether the line may be written at now, and how many
// occurrences were held back since the last one written.
func (l *logEvery) allow(now time.Time) (ok bool, held int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.period {
		l.held++
		return false, 0
	}
	held, l.held, l.last = l.held, 0, now
	return true, held
}

// guardedListener closes the traps of serving mochi from a bare listener:
// mochi stops serving for good on the first Accept error and sets no
// deadline before CONNECT. Its Accept retries every error with backoff and
// returns only once the listener is closed; it refuses sockets beyond max
// open ones, and beyond maxPending from one address (peeraddr.Key) whose
// CONNECT is not accepted yet; and it puts a deadline on each socket that
// covers the TLS handshake and the CONNECT packet (mochi replaces it with
// its keepalive deadline once CONNECT is accepted).
//
// The deadline alone does not stop one host from holding every slot: it
// costs the host nothing to open max sockets that never handshake and
// open each again as the deadline closes it. Only the sockets still
// pending count per address: an accepted session has proved a fleet
// certificate, and whole fleets connect from behind one NAT.
type guardedListener struct {
	net.Listener
	max        int
	maxPending int
	deadline   time.Duration
	// onRefuse is called for each socket closed because max were open.
	onRefuse func()
	// onRefusePending is called for each socket closed because its
	// address held maxPending pending sockets.
	onRefusePending func(key string)
	// onError is called for each Accept error that is retried.
	onError func(err error, backoff time.Duration)

	done      chan struct{}
	closeOnce sync.Once

	mu      sync.Mutex
	conns   map[*guardedConn]struct{} // open sockets; nil once closed
	pending map[string]int            // peeraddr.Key → open sockets not yet connected
}

func newGuardedListener(ln net.Listener, max, maxPending int, deadline time.Duration) *guardedListener {
	return &guardedListener{
		Listener:        ln,
		max:             max,
		maxPending:      maxPending,
		deadline:        deadline,
		onRefuse:        func() {},
		onRefusePending: func(string) {},
		onError:         func(error, time.Duration) {},
		done:            make(chan struct{}),
		conns:           make(map[*guardedConn]struct{}),
		pending:         make(map[string]int),
	}
}

// Accept returns the next socket, counted until its Close, with its
// handshake deadline set. It returns an error only after Close.
func (l *guardedListener) Accept() (net.Conn, error) {
	var backoff time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			select {
			case <-l.done:
				return nil, net.ErrClosed
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				// Someone closed the socket under us: retrying would spin.
				return nil, err
			}
			backoff = min(max(2*backoff, minAcceptBackoff), maxAcceptBackoff)
			l.onError(err, backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-l.done:
				t.Stop()
				return nil, net.ErrClosed
			}
			continue
		}
		backoff = 0

		key := peeraddr.Key(c.RemoteAddr())
		l.mu.Lock()
		if l.conns == nil {
			l.mu.Unlock()
			_ = c.Close()
			return nil, net.ErrClosed
		}
		// Checked first: when both limits are reached, the address at
		// its own is the likelier cause, and the one the log should name.
		if l.pending[key] >= l.maxPending {
			l.mu.Unlock()
			l.onRefusePending(key) // counted before the peer can see the close
			_ = c.Close()
			continue
		}
		if len(l.conns) >= l.max {
			l.mu.Unlock()
			l.onRefuse() // counted before the peer can see the close
			_ = c.Close()
			continue
		}
		gc := &guardedConn{Conn: c, l: l, key: key, pending: true}
		l.conns[gc] = struct{}{}
		l.pending[key]++
		l.mu.Unlock()

		if err := c.SetDeadline(time.Now().Add(l.deadline)); err != nil {
			_ = gc.Close() // the peer is already gone
			continue
		}
		return gc, nil
	}
}

// Close stops Accept and closes the listening socket; open sockets stay open
// (see closeConns).
func (l *guardedListener) Close() error {
	var err error
	l.closeOnce.Do(func() {
		close(l.done)
		err = l.Listener.Close()
	})
	return err
}

// closeConns closes every open socket and refuses later ones.
func (l *guardedListener) closeConns() {
	l.mu.Lock()
	conns := l.conns
	l.conns = nil
	l.mu.Unlock()
	for c := range conns {
		_ = c.Conn.Close()
	}
}

// open returns the number of open sockets.
func (l *guardedListener) open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

// pendingFrom returns the number of open sockets from the address with
// key whose CONNECT is not accepted yet.
func (l *guardedListener) pendingFrom(key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pending[key]
}

// settle stops counting c against its address's pending sockets, once.
// l.mu must be held.
func (l *guardedListener) settle(c *guardedConn) {
	if !c.pending {
		return
	}
	c.pending = false
	if l.pending[c.key]--; l.pending[c.key] <= 0 {
		delete(l.pending, c.key) // the map holds only addresses with sockets pending
	}
}

// guardedConn is an accepted socket, counted by its listener until Close,
// and against its address's pending sockets until connected or Close.
type guardedConn struct {
	net.Conn
	l       *guardedListener
	key     string // peeraddr.Key of the remote address
	pending bool   // guarded by l.mu
	once    sync.Once
}

// connected records that the socket's CONNECT was accepted. nil-safe:
// connections not from a guardedListener have nothing to record.
func (c *guardedConn) connected() {
	if c == nil {
		return
	}
	c.l.mu.Lock()
	c.l.settle(c)
	c.l.mu.Unlock()
}

func (c *guardedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.l.conns != nil {
			delete(c.l.conns, c)
		}
		c.l.settle(c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
