package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/time/rate"

	"github.com/fleetmq/fleetmq/store"
)

var (
	errRevoked     = errors.New("identity revoked")
	errCertExpired = errors.New("client certificate expired")
)

// refusal is why an identity may not connect; reason is a Reason… constant.
type refusal struct {
	reason string
	err    error
}

func (r *refusal) Error() string {
	if r.err != nil {
		return "connection refused: " + r.reason + ": " + r.err.Error()
	}
	return "connection refused: " + r.reason
}

func (r *refusal) Unwrap() error { return r.err }

func refuse(reason string, err error) *refusal { return &refusal{reason: reason, err: err} }

// grant is what an authorized connection may do: it is fixed at CONNECT.
type grant struct {
	id        string
	role      store.Role
	telemetry string // devices/{id}/telemetry
}

// conn is a client connection after its TLS handshake. mochi holds it as
// Client.Net.Conn for the life of the client, also after a disconnect while
// the session is kept, so the hooks find the connection's grant through it.
type conn struct {
	*tls.Conn
	b *Broker
	// The accepted socket, told when CONNECT is accepted (see
	// guardedListener); nil for a socket not from it.
	raw *guardedConn

	connectSeen atomic.Bool
	first       firstHeader           // only mochi's read goroutine uses it
	grant       atomic.Pointer[grant] // set once CONNECT is authorized
	revoked     atomic.Bool           // set by Revoke; denies everything
	closeOnce   sync.Once
	closed      chan struct{}
	acks        ackQueue
	// A message of this session the client has not acknowledged, which
	// mochi drops from its in-flight table while it handles the client's
	// PUBLISH with the same packet id; see keepOutbound. Only mochi's
	// read goroutine uses it.
	shadowed *packets.Packet
	// A service's retained deliveries (see retained.go): its session's,
	// set at the first SUBSCRIBE or taken from the connection before on a
	// resume; nil for devices. Atomic: a connection taking the session
	// over reads it while this one's goroutine may set it.
	retained atomic.Pointer[retainedQueue]
	// Indexes of the filters of the SUBSCRIBE being handled that were
	// over the subscription limit; only mochi's goroutine uses it.
	overLimit []int
	// The Receive Maximum of an MQTT 5 client, which mochi is not told
	// (see authorize); set before the CONNACK, then only read.
	receiveMax uint16
	// The resumed session's in-flight entries ranked for mochi's resend
	// (see resend.go); only mochi's goroutine for the client uses it.
	resend resendOrder

	// The deadline last set and how far a refresh may move it before it
	// is applied; only mochi's read goroutine sets deadlines.
	deadline      time.Time
	deadlineSlack time.Duration
	// The write deadline last set; see Write.
	wmu       sync.Mutex
	wdeadline time.Time
	stuck     sync.Once

	// Guarded by b.mu; id, cl and ident are set once, by register.
	id       string
	cl       *mqtt.Client
	ident    *identity
	kick     *time.Timer
	released bool
}

// Close releases the connection's registration, then closes it. mochi
// calls it through Client.Stop exactly once per connection, whichever way
// the connection ends.
func (c *conn) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.b.release(c)
	})
	return c.Conn.Close()
}

// maxConnectPacket is the largest CONNECT accepted, will message
// included: a device's needs a few hundred bytes.
const maxConnectPacket = 16 << 10

// Read refuses a first packet that is not a CONNECT of at most
// maxConnectPacket bytes before mochi sees its header: mochi allocates a
// packet's whole announced length as soon as it has read the header, so
// with five bytes each, connections not yet identified by a CONNECT could
// pin MaxPacketSize apiece until the handshake deadline.
func (c *conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if !c.first.done {
		if ferr := c.first.check(p[:n]); ferr != nil {
			return 0, ferr
		}
	}
	return n, err
}

// firstHeader follows the fixed header of a connection's first packet
// across reads: its type byte, then its remaining length, up to four
// bytes of seven bits each, least significant first.
type firstHeader struct {
	n    uint8  // header bytes seen
	size uint32 // remaining length so far
	done bool
}

func (h *firstHeader) check(b []byte) error {
	for _, x := range b {
		if h.done {
			return nil
		}
		if h.n == 0 {
			if x>>4 != packets.Connect {
				return packets.ErrProtocolViolationRequireFirstConnect
			}
			h.n++
			continue
		}
		h.size |= uint32(x&0x7f) << (7 * (h.n - 1))
		h.n++
		switch {
		case h.size > maxConnectPacket:
			return packets.ErrPacketTooLarge
		case x&0x80 == 0:
			h.done = true
		case h.n == 5:
			return packets.ErrMalformedVariableByteInteger
		}
	}
	return nil
}

// SetDeadline coalesces mochi's keepalive deadline refreshes. mochi moves
// the deadline to now + 1.5 keepalives before every packet it reads, and
// each move re-arms a runtime timer: under QoS 0 load that was 7% of the
// broker's time. A refresh is applied only once it would move
// the deadline by more than a sixteenth of the keepalive window, so a
// silent client is still given at least 15/16 of what mochi asked for
// (more than 1.4 keepalives).
func (c *conn) SetDeadline(t time.Time) error {
	if !t.IsZero() && !c.deadline.IsZero() {
		if d := t.Sub(c.deadline); d >= 0 && d < c.deadlineSlack {
			return nil
		}
	}
	c.deadline = t
	c.deadlineSlack = 0
	if !t.IsZero() {
		c.deadlineSlack = time.Until(t) / 16
	}
	// Writes have their own, shorter deadline (see Write).
	return c.Conn.SetReadDeadline(t)
}

// Write bounds every write by WriteTimeout. mochi writes to a client
// holding the client's lock, and a publisher delivering a QoS 1 message to
// it waits for that lock (Client.NextPacketID): without a bound, a
// subscriber that stops reading holds up the PUBACKs of every device it
// listens to until its keepalive runs out. Past the timeout the socket is
// closed, which ends the client for mochi. Like SetDeadline, the deadline
// moves only by more than a sixteenth of the timeout, sparing a timer
// re-arm per write.
func (c *conn) Write(p []byte) (int, error) {
	timeout := c.b.cfg.WriteTimeout
	c.wmu.Lock()
	if d := time.Now().Add(timeout); d.Sub(c.wdeadline) > timeout/16 {
		c.wdeadline = d
		_ = c.Conn.SetWriteDeadline(d)
	}
	c.wmu.Unlock()
	n, err := c.Conn.Write(p)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		c.stuck.Do(func() {
			c.b.stats.kicked.inc(KickWriteTimeout)
			var id string
			if g := c.grant.Load(); g != nil {
				id = g.id
			}
			c.b.log.Warn().Str("id", id).Stringer("timeout", timeout).
				Msg("broker: closing a client that stopped reading")
			// The TLS stream is broken mid-record: close the socket, not
			// the TLS connection (no close_notify can be sent).
			_ = c.Conn.NetConn().Close()
		})
	}
	return n, err
}

// leaf returns the verified client certificate.
func (c *conn) leaf() *x509.Certificate {
	cs := c.ConnectionState()
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return nil
	}
	return cs.VerifiedChains[0][0]
}

// allowed applies the connection's grant.
func (c *conn) allowed(topic string, write bool) bool {
	g := c.grant.Load()
	if g == nil || c.revoked.Load() {
		return false
	}
	if write && g.role == store.RoleDevice && isUnder(topic, g.telemetry) {
		// Nearly every publish: what Allowed would answer, without
		// splitting the topic.
		return wellFormed(topic, true)
	}
	return Allowed(g.role, g.id, topic, write)
}

// identity is the broker's state of one identity with connections.
type identity struct {
	lim   *rate.Limiter  // publish rate, shared by its connections
	conns map[*conn]bool // true once authorized
	// forget, while the identity has no connection, drops it once its
	// bucket has refilled: until then a reconnect must find the bucket as
	// it was left, or reconnecting would be a way around the limit.
	forget *time.Timer
}

func (i *identity) authorized() bool {
	for _, ok := range i.conns {
		if ok {
			return true
		}
	}
	return false
}

// register records c as a connection of id before the store is asked
// about id, so that a Revoke racing the check finds c and flags it.
func (b *Broker) register(c *conn, cl *mqtt.Client, id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if c.released {
		return false
	}
	ident := b.idents[id]
	if ident == nil {
		ident = &identity{
			lim:   rate.NewLimiter(rate.Limit(b.cfg.PublishRate), b.cfg.PublishBurst),
			conns: make(map[*conn]bool),
		}
		b.idents[id] = ident
	}
	if ident.forget != nil {
		ident.forget.Stop()
		ident.forget = nil
	}
	ident.conns[c] = false
	c.id, c.cl, c.ident = id, cl, ident
	return true
}

// activate marks a registered connection authorized, unless it was revoked
// or closed meanwhile, records the identity online and schedules the
// session's end at its certificate's expiry.
func (b *Broker) activate(c *conn, g *grant, notAfter time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if c.released || c.revoked.Load() {
		return false
	}
	c.ident.conns[c] = true
	c.grant.Store(g)
	cl := c.cl
	c.kick = time.AfterFunc(notAfter.Sub(b.cfg.Now()), func() {
		b.stats.kicked.inc(KickCertExpired)
		b.log.Info().Str("id", g.id).Msg("broker: certificate expired, closing session")
		cl.Stop(errCertExpired)
	})
	b.stats.sessionsTotal.Add(1)
	b.w.setPresence(store.Presence{DeviceID: g.id, Online: true, LastSeen: b.cfg.Now(), Node: b.cfg.Node})
	return true
}

// release forgets a closed connection and records its identity offline
// when it was the identity's last authorized connection.
func (b *Broker) release(c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c.released = true
	if c.kick != nil {
		c.kick.Stop()
	}
	ident := c.ident
	if ident == nil {
		return
	}
	wasAuthorized := ident.conns[c]
	delete(ident.conns, c)
	id := c.id
	if wasAuthorized && !ident.authorized() {
		b.w.setPresence(store.Presence{DeviceID: id, Online: false, LastSeen: b.cfg.Now(), Node: b.cfg.Node})
		b.noteGone(id)
	}
	if len(ident.conns) == 0 && b.idents[id] == ident {
		b.forgetWhenRefilled(id, ident)
	}
}

// maxPublishDelay is the longest an MQTT 3.1.1 publish over the rate limit
// is held for a token of the bucket before it is dropped.
const maxPublishDelay = time.Second

// allowPublish takes a token of the identity's publish bucket. An MQTT 5
// client over the limit is told at once (PUBACK 0x96). MQTT 3.1.1 has no
// way to say it: a dropped QoS 1 publish gets no PUBACK, and its sender
// waits for one until it gives up — the device-agent after 30 s, then it
// reconnects — so a backlog sent as fast as the client can would drain at a
// few messages a second. A 3.1.1 publish that a token will cover within
// maxPublishDelay therefore waits for it on the connection's own reader:
// the device is slowed to the rate (TCP pushes back), nothing is lost, and
// no other connection waits.
func (b *Broker) allowPublish(cl *mqtt.Client, c *conn) bool {
	if c.ident.lim.Allow() {
		return true // the common case, without Reserve's allocation
	}
	if cl.Properties.ProtocolVersion >= 5 {
		return false
	}
	r := c.ident.lim.Reserve()
	switch d := r.Delay(); {
	case !r.OK():
		return false
	case d == 0:
		return true
	case d > maxPublishDelay:
		r.Cancel()
		return false
	default:
		b.stats.delayed.Add(1)
		time.Sleep(d)
		return true
	}
}

// forgetWhenRefilled drops an identity without connections at once if its
// publish bucket is full, else when it will be. Called with b.mu held.
func (b *Broker) forgetWhenRefilled(id string, ident *identity) {
	now := time.Now() // the limiter's clock
	missing := float64(ident.lim.Burst()) - ident.lim.TokensAt(now)
	if missing <= 0 || ident.lim.Limit() <= 0 || ident.lim.Limit() == rate.Inf {
		delete(b.idents, id)
		return
	}
	wait := time.Duration(missing / float64(ident.lim.Limit()) * float64(time.Second))
	ident.forget = time.AfterFunc(wait, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if len(ident.conns) == 0 && b.idents[id] == ident {
			delete(b.idents, id)
		}
	})
}

// checkLeaf checks a verified client certificate against the store: its
// serial must be a certificate of the CN's identity, identical and not
// revoked, and the identity must exist and not be revoked.
func (b *Broker) checkLeaf(ctx context.Context, leaf *x509.Certificate) (store.Device, *refusal) {
	id := leaf.Subject.CommonName
	serial := leaf.SerialNumber.Text(16) // the store's format (enroll.SerialHex)
	cert, err := b.st.Cert(ctx, serial)
	switch {
	case errors.Is(err, store.ErrCertUnknown):
		return store.Device{}, refuse(ReasonCertUnknown, err)
	case err != nil:
		return store.Device{}, refuse(ReasonStore, err)
	case cert.DeviceID != id || (len(cert.DER) > 0 && !bytes.Equal(cert.DER, leaf.Raw)):
		return store.Device{}, refuse(ReasonCertMismatch, nil)
	}
	dev, err := b.st.Device(ctx, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return store.Device{}, refuse(ReasonUnknownIdentity, err)
	case err != nil:
		return store.Device{}, refuse(ReasonStore, err)
	// The identity first: revoking it revokes its certificates too, and a
	// certificate revoked alone (re-provisioning) leaves the identity be.
	case dev.Revoked():
		return store.Device{}, refuse(ReasonRevoked, store.ErrDeviceRevoked)
	case cert.Revoked():
		return store.Device{}, refuse(ReasonRevoked, store.ErrCertRevoked)
	}
	return dev, nil
}

// recheckLoop checks the sessions on this node against the store every
// RecheckInterval until Close.
func (b *Broker) recheckLoop() {
	t := time.NewTicker(b.cfg.RecheckInterval)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			b.recheck()
		}
	}
}

// recheck closes the connections whose identity or certificate the store
// now says is revoked. Revoke does that at once for revocations made
// through this node; this catches those made through another node sharing
// the store, which cannot reach this one's sessions. A store that cannot
// answer closes nothing: the handshake refuses new connections meanwhile.
func (b *Broker) recheck() {
	b.mu.Lock()
	var conns []*conn
	for _, ident := range b.idents {
		for c := range ident.conns {
			conns = append(conns, c)
		}
	}
	b.mu.Unlock()
	b.closeRevoked(conns, "broker: identity revoked elsewhere disconnected")
}

// CloseRevokedCerts closes at once the sessions of identity id whose
// certificate the store now says is revoked, as after a re-provisioning:
// the identity itself stays, and so do its sessions on a current
// certificate.
func (b *Broker) CloseRevokedCerts(id string) {
	b.mu.Lock()
	var conns []*conn
	if ident := b.idents[id]; ident != nil {
		for c := range ident.conns {
			conns = append(conns, c)
		}
	}
	b.mu.Unlock()
	b.closeRevoked(conns, "broker: session on a revoked certificate disconnected")
}

// closeRevoked closes those of conns whose certificate or identity the
// store says is revoked.
func (b *Broker) closeRevoked(conns []*conn, msg string) {
	for _, c := range conns {
		select {
		case <-b.stop:
			return
		default:
		}
		certs := c.Conn.ConnectionState().PeerCertificates
		if len(certs) == 0 {
			continue
		}
		_, r := b.checkLeaf(context.Background(), certs[0])
		if r == nil || r.reason != ReasonRevoked {
			continue
		}
		c.revoked.Store(true)
		b.mu.Lock()
		cl, id := c.cl, c.id
		b.mu.Unlock()
		if cl == nil {
			continue // refused at CONNECT by the flag
		}
		identity := errors.Is(r.err, store.ErrDeviceRevoked)
		if identity {
			// Once per identity: stopRevoked silences its topics, so a
			// second connection's removal reaches no subscriber.
			b.clearStatus(id)
		}
		if b.stopRevoked(cl, identity) {
			b.log.Info().Str("id", id).Msg(msg)
		}
	}
}

// verifyConnection refuses revoked and unknown certificates during the
// handshake, resumed ones included.
func (b *Broker) verifyConnection(cs tls.ConnectionState) error {
	if cs.DidResume {
		b.stats.resumed.Add(1)
	}
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return refuse(ReasonNoCertificate, nil)
	}
	if _, r := b.checkLeaf(context.Background(), cs.VerifiedChains[0][0]); r != nil {
		return r
	}
	return nil
}

// serveConn runs one accepted socket: the TLS handshake under the accept
// deadline, then mochi.
func (b *Broker) serveConn(raw net.Conn, establish listeners.EstablishFn) {
	b.stats.accepted.Add(1)
	tc := tls.Server(raw, b.tls)
	if err := tc.Handshake(); err != nil {
		reason := handshakeReason(err)
		b.stats.handshake.inc(reason)
		b.log.Debug().Err(err).Str("remote", raw.RemoteAddr().String()).Str("reason", reason).Msg("broker: tls handshake failed")
		_ = tc.Close()
		return
	}
	gc, _ := raw.(*guardedConn)
	c := &conn{Conn: tc, b: b, closed: make(chan struct{}), raw: gc}
	err := b.establish(establish, c) // returns when the connection has ended
	if !c.connectSeen.Load() {
		reason := ReasonNoConnect
		var code packets.Code
		switch {
		case isTimeout(err):
			reason = ReasonConnectTimeout
		case errors.As(err, &code):
			reason = ReasonProtocol
		}
		b.stats.refused.inc(reason)
		b.log.Debug().Err(err).Str("remote", raw.RemoteAddr().String()).Str("reason", reason).Msg("broker: no CONNECT")
		return
	}
	b.log.Debug().Err(err).Str("remote", raw.RemoteAddr().String()).Msg("broker: connection ended")
}

// establish runs mochi on c until the connection ends. mochi decodes and
// handles a client's packets on this goroutine, and some malformed packets
// make it panic (v2.7.9 reads past the end of an MQTT 5 SUBSCRIBE whose
// last filter has no options byte): uncaught, one client's packet would end
// the process and every session in it. Recovered, it ends that connection
// only, as mochi ends one whose packet it refuses.
func (b *Broker) establish(establish listeners.EstablishFn, c *conn) (err error) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		// Here, on top of the panicking frames: see panicSite.
		b.endPanicked(c, r, panicSite())
		err = fmt.Errorf("%w: the MQTT library failed on it: %v", packets.ErrMalformedPacket, r)
	}()
	return establish(listenerID, c)
}

// endPanicked finishes the connection c whose packet made mochi panic with
// r at site. mochi's deferred calls have closed it; what the panic skipped
// is what mochi does when a connection ends in error: send the last will,
// and end a session that is not kept, which would otherwise stay in its
// client map, with its subscriptions and in-flight messages, until the
// expiry loop found it.
func (b *Broker) endPanicked(c *conn, r any, site string) {
	b.mu.Lock()
	cl, id := c.cl, c.id
	b.mu.Unlock()
	// The panic value names the failure (an index out of range, say), not
	// the packet's content; site is what a report to mochi needs.
	b.log.Error().Str("id", id).Str("remote", c.RemoteAddr().String()).Str("panic", fmt.Sprint(r)).Str("at", site).
		Msg("broker: a client's packet made the MQTT library fail: connection closed, the broker goes on")
	if cl == nil {
		return // CONNECT not yet handled: mochi holds nothing of it
	}
	b.sendWill(cl)
	// mochi's own test when a connection ends (Server.attachClient).
	kept := (cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryInterval > 0) ||
		(cl.Properties.ProtocolVersion < 5 && !cl.Properties.Clean)
	if cur, ok := b.srv.Clients.Get(cl.ID); kept || !ok || cur != cl || cl.IsTakenOver() {
		return
	}
	cl.ClearInflights()
	b.srv.UnsubscribeClient(cl)
	b.srv.Clients.Delete(cl.ID)
}

// sendWill publishes the last will of cl, whose connection ended without
// mochi seeing it end (see endPanicked), as mochi would have: its topic was
// checked at CONNECT, and its retain flag kept only where it may be (see
// authorize). mochi keeps delayed wills in a table of its own, out of
// reach: a will with a delay is not sent.
func (b *Broker) sendWill(cl *mqtt.Client) {
	w := cl.Properties.Will
	if cl.IsTakenOver() || w.WillDelayInterval > 0 || !atomic.CompareAndSwapUint32(&cl.Properties.Will.Flag, 1, 0) {
		return
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: w.Qos, Retain: w.Retain},
		TopicName:   w.TopicName,
		Payload:     w.Payload,
		Properties:  packets.Properties{User: w.User},
		// mochi refuses a QoS 1/2 publish without a packet id, also from
		// its inline client, whose publishes are never acknowledged: the
		// agent's QoS 1 will was not sent.
		PacketID: uint16(min(w.Qos, 1)),
	}
	if err := b.srv.InjectPacket(b.inline, pk); err != nil {
		b.log.Warn().Err(err).Str("id", cl.ID).Msg("broker: last will not sent")
	}
}

// panicSite names the function and line that panicked. Called by a
// deferred function during the panic, the frames above its caller are the
// runtime's panic machinery, then the code that panicked.
func panicSite() string {
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	for {
		f, more := frames.Next()
		if f.Function != "" && !strings.HasPrefix(f.Function, "runtime.") {
			return fmt.Sprintf("%s (%s:%d)", f.Function, filepath.Base(f.File), f.Line)
		}
		if !more {
			return "unknown"
		}
	}
}

// handshakeReason classifies a failed server handshake.
func handshakeReason(err error) string {
	var r *refusal
	var cve *tls.CertificateVerificationError
	switch {
	case errors.As(err, &r):
		return r.reason
	case isTimeout(err):
		return ReasonTimeout
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, net.ErrClosed):
		return ReasonClosed
	case errors.As(err, &cve):
		var ua x509.UnknownAuthorityError
		var ci x509.CertificateInvalidError
		switch {
		case errors.As(cve.Err, &ua):
			return ReasonUnknownAuthority
		case errors.As(cve.Err, &ci) && ci.Reason == x509.Expired:
			return ReasonCertExpired
		}
		return ReasonCertInvalid
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		// crypto/tls has no typed error for it.
		return ReasonNoCertificate
	}
	return ReasonTLS
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// mqttListener serves mochi from the guarded listener. It replaces
// listeners.Net so that the broker owns the connection goroutines: Close
// can wait for all of them before mochi walks its client map, and failed
// handshakes never reach mochi (nor its per-connection warning).
type mqttListener struct {
	b  *Broker
	ln *guardedListener
}

func (l *mqttListener) ID() string              { return listenerID }
func (l *mqttListener) Address() string         { return l.ln.Addr().String() }
func (l *mqttListener) Protocol() string        { return "tcp" }
func (l *mqttListener) Init(*slog.Logger) error { return nil }

func (l *mqttListener) Serve(establish listeners.EstablishFn) {
	defer close(l.b.serveDone)
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			return // closed: the guarded listener retries everything else
		}
		l.b.conns.Add(1)
		go func() {
			defer l.b.conns.Done()
			l.b.serveConn(raw, establish)
		}()
	}
}

// Close stops accepting. Connections are closed by Broker.Close, not
// through mochi's callback, which walks the client map while clients come
// and go (mochi #488).
func (l *mqttListener) Close(listeners.CloseFn) { _ = l.ln.Close() }
