// Package broker is fleetmq's MQTT broker core: mochi-mqtt behind an
// mTLS-only listener, where the identity of a client is the CN of its
// verified certificate, each identity may only use the topics of its role
// (see Allowed), revocation closes live sessions, and device telemetry is
// committed to the store before it is acknowledged.
//
// The traps of serving mochi directly are closed here: the listener retries
// Accept errors instead of stopping, caps open sockets and puts a deadline
// on the TLS handshake and CONNECT; one hook does authentication and ACLs
// (mochi ORs hooks, so there is no permissive one anywhere); client ids must
// equal the certificate CN; mochi's logs lose their packet dumps.
package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/store"
)

// maxInflight is the most outbound QoS 1/2 messages a session holds
// unacknowledged (see New).
const maxInflight = 256

// Store is what the broker needs from the fleet store.
type Store interface {
	// Device returns identity id, or an error wrapping store.ErrNotFound.
	Device(ctx context.Context, id string) (store.Device, error)
	// Cert returns the certificate record of serial (lowercase hex), or an
	// error wrapping store.ErrCertUnknown.
	Cert(ctx context.Context, serial string) (store.Cert, error)
	// AppendTelemetry stores msgs; nil means they are on disk.
	AppendTelemetry(ctx context.Context, msgs []store.Message) error
	// SetPresence stores the connection state of identities.
	SetPresence(ctx context.Context, ps ...store.Presence) error
}

// Config configures a Broker. Zero values mean the documented default.
type Config struct {
	// Addr is the TCP address to listen on. Default ":8883".
	Addr string
	// GetCertificate returns the server certificate; the caller renews it.
	// Required.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// ClientCAs is the fleet CA that client certificates must chain to.
	// Required.
	ClientCAs *x509.CertPool
	// HandshakeTimeout is the deadline, from accept, for the TLS handshake
	// and the CONNECT packet together. Default 10s.
	HandshakeTimeout time.Duration
	// MaxConnections is the most sockets open at once; beyond it new
	// sockets are closed at once and counted. Default 10000. It is
	// lowered, with a warning at Start, to what OpenFileLimit leaves after
	// a reserve for the rest of the process (a quarter, at least 32).
	MaxConnections int
	// MaxPendingPerAddress is the most sockets one remote address (an
	// IPv6 /64) may hold open before their CONNECT is accepted: in the TLS
	// handshake or waiting for CONNECT. Beyond it new sockets from that
	// address are closed at once and counted. Without it one host opening
	// sockets that never handshake holds every MaxConnections slot.
	// Sessions do not count: a whole fleet may connect from behind one
	// NAT, whose reconnection all at once after a restart this slows
	// without locking it out. Default 256.
	MaxPendingPerAddress int
	// OpenFileLimit is the most files the process may open. Default the
	// process's RLIMIT_NOFILE; 0 after defaults means unknown (no cap).
	OpenFileLimit uint64
	// MaxPacketSize is the largest MQTT packet accepted, in bytes.
	// Default 256 KiB.
	MaxPacketSize uint32
	// WriteQueue is the number of packets queued per connection for
	// writing (mochi's MaximumClientWritesPending); more are dropped.
	// Default 128.
	WriteQueue int
	// WriteTimeout is the longest one write to a client may block. mochi
	// writes to a client holding its lock, which every publisher delivering
	// to that client waits for: a subscriber that stops reading (a stuck
	// backend, a half-dead link) would hold up the PUBACKs of every device
	// it listens to. Past this it is disconnected (its session is kept).
	// Default 10s.
	WriteTimeout time.Duration
	// RecheckInterval is how often the sessions on this node are checked
	// against the store, which closes those whose identity was revoked
	// through another node sharing it. Revocations through this node
	// (Revoke) close sessions at once. Default 30s.
	RecheckInterval time.Duration
	// SessionExpiry is the longest a disconnected session is kept.
	// Default 1h.
	SessionExpiry time.Duration
	// MaxKeepalive is the longest keepalive granted. A client asking for
	// none (0) or more gets this one (MQTT 5 clients are told so in the
	// CONNACK); a connection silent for 1.5 times its keepalive is closed.
	// Default 5m; at most 65535s.
	MaxKeepalive time.Duration
	// PublishRate is the sustained publish rate allowed per identity, in
	// messages per second, shared by its connections. Default 100.
	PublishRate float64
	// PublishBurst is the publish burst allowed per identity. Default 200.
	PublishBurst int
	// MaxTelemetryPayload is the largest telemetry payload stored, in
	// bytes; larger telemetry publishes are refused. Default 64 KiB.
	MaxTelemetryPayload int
	// Node is this server's name, recorded in presence. Default the host
	// name.
	Node string
	// Logger receives the broker's and mochi's logs. Default zerolog.Nop().
	Logger zerolog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

func (c *Config) setDefaults() {
	if c.Addr == "" {
		c.Addr = ":8883"
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = 10000
	}
	if c.MaxPendingPerAddress == 0 {
		c.MaxPendingPerAddress = 256
	}
	if c.OpenFileLimit == 0 {
		c.OpenFileLimit = openFileLimit()
	}
	if c.MaxPacketSize == 0 {
		c.MaxPacketSize = 256 << 10
	}
	if c.WriteQueue == 0 {
		c.WriteQueue = 128
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.RecheckInterval == 0 {
		c.RecheckInterval = 30 * time.Second
	}
	if c.SessionExpiry == 0 {
		c.SessionExpiry = time.Hour
	}
	if c.MaxKeepalive == 0 {
		c.MaxKeepalive = 5 * time.Minute
	}
	if c.PublishRate == 0 {
		c.PublishRate = 100
	}
	if c.PublishBurst == 0 {
		c.PublishBurst = 200
	}
	if c.MaxTelemetryPayload == 0 {
		c.MaxTelemetryPayload = 64 << 10
	}
	if c.Node == "" {
		if h, err := os.Hostname(); err == nil {
			c.Node = h
		}
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

func (c *Config) validate() error {
	switch {
	case c.GetCertificate == nil:
		return errors.New("broker config: GetCertificate is required")
	case c.ClientCAs == nil:
		return errors.New("broker config: ClientCAs is required")
	case c.HandshakeTimeout < 0:
		return fmt.Errorf("broker config: HandshakeTimeout %s is negative", c.HandshakeTimeout)
	case c.MaxConnections < 0:
		return fmt.Errorf("broker config: MaxConnections %d is negative", c.MaxConnections)
	case c.MaxPendingPerAddress < 0:
		return fmt.Errorf("broker config: MaxPendingPerAddress %d is negative", c.MaxPendingPerAddress)
	case c.WriteQueue < 0 || c.WriteQueue > math.MaxInt32:
		return fmt.Errorf("broker config: WriteQueue %d is out of range", c.WriteQueue)
	case c.WriteTimeout < 100*time.Millisecond:
		return fmt.Errorf("broker config: WriteTimeout %s is under 100ms", c.WriteTimeout)
	case c.SessionExpiry < time.Second || c.SessionExpiry/time.Second > math.MaxUint32:
		return fmt.Errorf("broker config: SessionExpiry %s is out of range", c.SessionExpiry)
	case c.MaxKeepalive < time.Second || c.MaxKeepalive/time.Second > math.MaxUint16:
		return fmt.Errorf("broker config: MaxKeepalive %s is out of range (1s to 65535s)", c.MaxKeepalive)
	case !(c.PublishRate > 0) || math.IsInf(c.PublishRate, 0):
		return fmt.Errorf("broker config: PublishRate %g must be positive", c.PublishRate)
	case c.PublishBurst < 0:
		return fmt.Errorf("broker config: PublishBurst %d is negative", c.PublishBurst)
	case c.MaxTelemetryPayload < 0:
		return fmt.Errorf("broker config: MaxTelemetryPayload %d is negative", c.MaxTelemetryPayload)
	}
	return nil
}

// Broker states.
const (
	stateNew = iota
	stateStarted
	stateClosed
)

// listenerID is the id of the broker's one mochi listener.
const listenerID = "mqtts"

// readBuffer is the size of mochi's per-connection read buffer.
const readBuffer = 512

// Broker is the MQTT broker. Its methods are safe for concurrent use.
type Broker struct {
	cfg    Config
	st     Store
	log    zerolog.Logger
	srv    *mqtt.Server
	inline *mqtt.Client // mochi's inline client, which delivers acknowledged QoS 1 publishes
	tls    *tls.Config
	w      *telemetryWriter
	stats  *counters

	serverCert atomic.Pointer[trimmed] // see getCertificate

	mu     sync.Mutex
	state  int
	ln     *guardedListener
	idents map[string]*identity // identities with a connection past the TLS handshake

	fmu       sync.RWMutex
	followers map[string]map[*follower]struct{} // by device id; nil once closed
	nfollow   atomic.Int64

	// Subscriptions held by clients other than devices, by client id and
	// filter (see subscribers.go).
	smu       sync.Mutex
	watchers  map[string]struct{}
	nwatchers atomic.Int64

	events eventWaiters // operators' commands waiting for a reply (see command.go)

	// Identities revoked lately, by revocation time (see silence.go).
	silMu         sync.Mutex
	silenced      map[string]time.Time
	silencedUntil atomic.Int64 // Unix ns: the last revocation's silence ends

	serveDone chan struct{} // closed when the accept loop has returned
	stop      chan struct{} // closed by Close: ends the recheck loop
	recheckWG sync.WaitGroup
	conns     sync.WaitGroup // connection goroutines, mochi's included
	ackers    sync.WaitGroup // acker goroutines (see ack.go)
	retainers sync.WaitGroup // retained deliveries to services (see retained.go)
	closeOnce sync.Once
	closeErr  error
}

// New returns a broker for cfg and st; it does not listen until Start.
func New(cfg Config, st Store) (*Broker, error) {
	if st == nil {
		return nil, errors.New("broker: store is required")
	}
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	b := &Broker{
		cfg:       cfg,
		st:        st,
		log:       cfg.Logger,
		stats:     newCounters(),
		idents:    make(map[string]*identity),
		followers: make(map[string]map[*follower]struct{}),
		watchers:  make(map[string]struct{}),
		silenced:  make(map[string]time.Time),
		serveDone: make(chan struct{}),
		stop:      make(chan struct{}),
	}
	b.w = newTelemetryWriter(st, b.log, b.stats, b.notifyFollowers)
	b.tls = &tls.Config{
		MinVersion: tls.VersionTLS12,
		// TLS 1.2 suites: ECDHE and AEAD only. TLS 1.3 suites are not
		// configurable and all qualify.
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		GetCertificate: b.getCertificate,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      cfg.ClientCAs,
		// VerifyConnection, unlike VerifyPeerCertificate, also runs when a
		// session is resumed from a ticket: revocation holds for those too.
		VerifyConnection: b.verifyConnection,
		Time:             cfg.Now,
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = cfg.MaxPacketSize
	caps.MaximumClientWritesPending = int32(cfg.WriteQueue)
	caps.MaximumSessionExpiryInterval = uint32(cfg.SessionExpiry / time.Second)
	caps.MinimumProtocolVersion = 4 // MQTT 3.1.1
	// Outbound QoS 1/2 messages kept per session (default 8192), each up
	// to MaxPacketSize: what a subscriber's kept session holds while its
	// client is away or stuck. 256 in flight is plenty for a reading
	// client; more only grows what a stuck one pins (about twice the
	// payloads, as mochi keeps its read buffer and a copy).
	caps.MaximumInflight = maxInflight
	// Topic aliases would let a v5 client publish without a topic name;
	// the ACL is checked on the name, so aliases are refused.
	caps.TopicAliasMaximum = 0
	caps.SharedSubAvailable = 0 // $share/... is denied by Allowed anyway
	// mochi's default (a day) deletes every retained message a day after
	// it was published, whatever its publisher asked, and stamps that
	// expiry on deliveries to MQTT 5 subscribers: the agent's retained
	// status, published once per connection, vanished from devices online
	// (or offline) for longer. Retained messages are bounded by the number
	// of devices (see retainable), not by age; an expiry the publisher
	// sets still holds.
	caps.MaximumMessageExpiryInterval = 0
	// mochi copies a publish's properties into its acknowledgement, and
	// with them its QoS 1 "granted" code 0x01, which no PUBACK may carry
	// (MQTT 5 3.4.2.1): without the copy the PUBACK is a plain success.
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	b.srv = mqtt.New(&mqtt.Options{
		Capabilities: caps,
		InlineClient: true,
		// Each connection keeps its read buffer for life (2 KiB by
		// default); crypto/tls already buffers a whole record below it.
		ClientNetReadBufferSize: readBuffer,
		Logger:                  newMochiLogger(b.log),
		// $SYS topics are denied to every client; refresh them rarely, as
		// each refresh reads runtime.MemStats.
		SysTopicResendInterval: 3600,
	})
	if err := b.srv.AddHook(&hook{b: b}, nil); err != nil {
		return nil, fmt.Errorf("broker: add hook: %w", err)
	}
	inline, ok := b.srv.Clients.Get(mqtt.InlineClientId)
	if !ok {
		return nil, errors.New("broker: mochi has no inline client")
	}
	b.inline = inline
	return b, nil
}

// Start binds the listening socket, so that a busy port is an error here,
// and serves in the background until Close.
func (b *Broker) Start() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.state {
	case stateStarted:
		return errors.New("broker: already started")
	case stateClosed:
		return errors.New("broker: closed")
	}
	ln, err := net.Listen("tcp", b.cfg.Addr)
	if err != nil {
		return fmt.Errorf("broker: listen: %w", err)
	}
	maxConns := b.cfg.MaxConnections
	if nofile := b.cfg.OpenFileLimit; nofile > 0 {
		if c := fdConnectionCap(nofile); c < maxConns {
			// Refused sockets are counted and logged as over the limit;
			// a process out of descriptors would fail the admin socket
			// and enrollment too, with nothing but accept errors to say why.
			b.log.Warn().Int("max_connections", maxConns).Uint64("open_file_limit", nofile).Int("accepting", c).
				Msgf("broker: the process may open at most %d files, too few for --max-connections %d: accepting at most %d MQTT connections, "+
					"to keep descriptors for enrollment, the admin socket and metrics; raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) to allow more",
					nofile, maxConns, c)
			maxConns = c
		}
	}
	gl := newGuardedListener(ln, maxConns, b.cfg.MaxPendingPerAddress, b.cfg.HandshakeTimeout)
	refusals := logEvery{period: time.Minute}
	gl.onRefuse = func() {
		b.stats.refused.inc(ReasonMaxConnections)
		// Devices only see a closed socket: the log says why.
		if ok, held := refusals.allow(time.Now()); ok {
			b.log.Warn().Int("max_connections", maxConns).Int("refused_since_last_logged", held).
				Msg("broker: refusing connections: the connection limit is reached (--max-connections, or the open file limit logged at start; every refusal is counted in fleetmq_mqtt_connect_refusals_total{reason=\"max_connections\"})")
		}
	}
	pendingRefusals := logEvery{period: time.Minute}
	gl.onRefusePending = func(key string) {
		b.stats.refused.inc(ReasonMaxPending)
		if ok, held := pendingRefusals.allow(time.Now()); ok {
			b.log.Warn().Str("remote", key).Int("max_pending_per_address", b.cfg.MaxPendingPerAddress).Int("refused_since_last_logged", held).
				Msg("broker: refusing connections from one address: it holds --max-pending-per-address sockets that have not completed CONNECT " +
					"(a host opening sockets it never uses, or many devices behind one NAT connecting at once, which then retry; " +
					"raise the flag if such a NAT is slow to reconnect; logged at most once a minute, every refusal is counted in " +
					"fleetmq_mqtt_connect_refusals_total{reason=\"max_pending_per_address\"})")
		}
	}
	acceptFailures := logEvery{period: time.Minute}
	gl.onError = func(err error, backoff time.Duration) {
		b.stats.acceptErrors.Add(1)
		ok, held := acceptFailures.allow(time.Now())
		if !ok {
			return
		}
		advice := "retrying"
		if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
			advice = "the process is out of file descriptors: raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) " +
				"or lower --max-connections; retrying"
		}
		b.log.Warn().Err(err).Stringer("retry_in", backoff).Int("failed_since_last_logged", held).
			Msg("broker: accept failed (logged at most once a minute while it lasts): " + advice)
	}
	if err := b.srv.AddListener(&mqttListener{b: b, ln: gl}); err != nil {
		_ = ln.Close()
		return fmt.Errorf("broker: add listener: %w", err)
	}
	go b.w.run()
	if err := b.srv.Serve(); err != nil {
		// Serve fails only before it starts serving; nothing to undo but
		// the socket and the writer.
		_ = gl.Close()
		b.w.close()
		b.state = stateClosed
		return fmt.Errorf("broker: serve: %w", err)
	}
	b.ln = gl
	b.state = stateStarted
	b.recheckWG.Go(b.recheckLoop)
	b.log.Info().Str("addr", ln.Addr().String()).Msg("broker: listening")
	return nil
}

// Addr returns the address the broker listens on, or nil before Start.
func (b *Broker) Addr() net.Addr {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ln == nil {
		return nil
	}
	return b.ln.Addr()
}

// Close stops accepting, closes every connection, stops mochi and writes
// the telemetry and presence still queued. It is idempotent.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() { b.closeErr = b.close() })
	return b.closeErr
}

func (b *Broker) close() error {
	b.mu.Lock()
	started := b.state == stateStarted
	b.state = stateClosed
	ln := b.ln
	b.mu.Unlock()

	if started {
		close(b.stop)
		b.recheckWG.Wait()
		_ = ln.Close()
		<-b.serveDone
		// No socket is accepted any more, so closing those open now ends
		// every connection goroutine; waiting for them means mochi's
		// client map is quiet when its Close walks it (mochi #488).
		ln.closeConns()
		b.conns.Wait()
		b.retainers.Wait() // each ends with its connection
		// Every hook has returned: the writer gets no more work. What it
		// still commits is acknowledged (to closed connections) by ackers
		// it starts, which need mochi for delivery.
		b.w.close()
		b.ackers.Wait()
		if err := b.srv.Close(); err != nil {
			b.log.Error().Err(err).Msg("broker: stopping mochi")
		}
	}

	b.fmu.Lock()
	for _, fs := range b.followers {
		for f := range fs {
			close(f.ch)
		}
	}
	b.followers = nil
	b.fmu.Unlock()
	b.log.Info().Msg("broker: closed")
	return nil
}

// Revoke closes the live sessions of identity id at once and keeps any
// session state mochi holds for it from receiving messages. Call it after
// revoking the identity in the store: new connections are refused there.
func (b *Broker) Revoke(id string) {
	if id == mqtt.InlineClientId {
		return // never a client's id (see authorize); mochi's own client
	}
	b.mu.Lock()
	var cls []*mqtt.Client
	if ident := b.idents[id]; ident != nil {
		for c := range ident.conns {
			// A connection still between its handshake and its store
			// check sees this flag and is refused (see authorize).
			c.revoked.Store(true)
			if c.cl != nil {
				cls = append(cls, c.cl)
			}
		}
	}
	b.mu.Unlock()
	if cl, ok := b.srv.Clients.Get(id); ok {
		if c, ok := cl.Net.Conn.(*conn); ok {
			c.revoked.Store(true)
		}
		cls = append(cls, cl)
	}
	// Before stopRevoked silences the identity's topics, which would keep
	// the removal from its subscribers; also for a device offline now,
	// whose last will left its status retained.
	b.clearStatus(id)
	for _, cl := range cls {
		b.stopRevoked(cl, true)
	}
	if len(cls) > 0 {
		b.log.Info().Str("id", id).Msg("broker: revoked identity disconnected")
	}
}

// stopRevoked ends a session on a revoked certificate, counted once. Its
// key may be in other hands: it publishes nothing more, not even its last
// will, which mochi would send as the connection ends; and the status it
// left retained, "online" as likely as not, is dropped. When the identity
// itself is revoked (identity), the fleet has no such device any more:
// its topics are silenced too, since a will already waiting out its delay
// is out of mochi's API (see silence.go).
func (b *Broker) stopRevoked(cl *mqtt.Client, identity bool) bool {
	open := !cl.Closed()
	if open {
		b.stats.kicked.inc(KickRevoked)
	}
	atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
	if identity {
		b.silence(cl.ID)
	}
	cl.Stop(errRevoked)
	b.srv.Topics.RetainMessage(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName:   topicRoot + "/" + cl.ID + "/" + levelStatus,
	})
	return open
}

// clearStatus removes identity id's retained status the way MQTT does, with
// an empty retained message, which its subscribers receive. Dropping it
// from the retained table alone told no one: a backend following
// devices/+/status kept the "online" it last saw of a revoked device, whose
// last will is never sent, for good.
func (b *Broker) clearStatus(id string) {
	if d, err := b.st.Device(context.Background(), id); err == nil && d.Role != store.RoleDevice {
		return // only devices have a status; services and operators none
	}
	// At QoS 1, as the agent publishes its status: a backend away with a
	// kept session gets the removal when it comes back.
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true, Qos: 1},
		TopicName:   topicRoot + "/" + id + "/" + levelStatus,
		PacketID:    1, // mochi refuses a QoS 1 publish without one; the inline client's are never acknowledged
	}
	if err := b.srv.InjectPacket(b.inline, pk); err != nil {
		b.log.Warn().Err(err).Str("id", id).Msg("broker: status of a revoked identity not cleared for its subscribers")
	}
}

// UnwrittenPresence returns, by identity, the presence changes this node
// has seen but not yet stored: they are written at most presenceDelay
// later, and until then they are newer than the store's.
func (b *Broker) UnwrittenPresence() map[string]store.Presence {
	return b.w.unwrittenPresence()
}

// Online returns the ids of the identities connected to this node, sorted.
func (b *Broker) Online() []string {
	b.mu.Lock()
	ids := make([]string, 0, len(b.idents))
	for id, ident := range b.idents {
		if ident.authorized() {
			ids = append(ids, id)
		}
	}
	b.mu.Unlock()
	slices.Sort(ids)
	return ids
}

// Stats returns a snapshot of the broker's counters.
func (b *Broker) Stats() Stats {
	s := b.stats.snapshot()
	s.DeliveriesDroppedInflightFull = uint64(max(atomic.LoadInt64(&b.srv.Info.InflightDropped), 0))
	b.mu.Lock()
	if b.ln != nil {
		s.OpenConnections = b.ln.open()
	}
	for _, ident := range b.idents {
		for _, ok := range ident.conns {
			if ok {
				s.Sessions++
			}
		}
	}
	b.mu.Unlock()
	return s
}

// follower is one Follow reader.
type follower struct {
	ch chan store.Message
}

// Follow streams the telemetry of deviceID as it is committed to the store,
// until cancel is called or the broker closes; then the channel is closed.
// A reader that falls followBuffer messages behind loses messages (counted
// in Stats.FollowDropped) rather than slow the writer. Payloads are shared:
// do not modify them.
func (b *Broker) Follow(deviceID string) (<-chan store.Message, func()) {
	f := &follower{ch: make(chan store.Message, followBuffer)}
	b.fmu.Lock()
	if b.followers == nil {
		b.fmu.Unlock()
		close(f.ch)
		return f.ch, func() {}
	}
	fs := b.followers[deviceID]
	if fs == nil {
		fs = make(map[*follower]struct{})
		b.followers[deviceID] = fs
	}
	fs[f] = struct{}{}
	b.nfollow.Add(1)
	b.fmu.Unlock()

	var once sync.Once
	cancel := func() {
		once.Do(func() {
			b.fmu.Lock()
			defer b.fmu.Unlock()
			fs := b.followers[deviceID]
			if _, ok := fs[f]; !ok {
				return // the broker closed it
			}
			delete(fs, f)
			if len(fs) == 0 {
				delete(b.followers, deviceID)
			}
			b.nfollow.Add(-1)
			close(f.ch)
		})
	}
	return f.ch, cancel
}

// notifyFollowers hands committed messages to Follow readers, never
// blocking: the writer calls it.
func (b *Broker) notifyFollowers(msgs []store.Message) {
	if b.nfollow.Load() == 0 {
		return
	}
	b.fmu.RLock()
	defer b.fmu.RUnlock()
	for _, m := range msgs {
		for f := range b.followers[m.DeviceID] {
			select {
			case f.ch <- m:
			default:
				b.stats.followDropped.Add(1)
			}
		}
	}
}
