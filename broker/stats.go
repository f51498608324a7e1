package broker

import "sync/atomic"

// Reasons a connection is refused before or at CONNECT, or a TLS handshake
// fails: the keys of Stats.Refused and Stats.HandshakeFailures.
const (
	// Socket level.
	ReasonMaxConnections = "max_connections"         // MaxConnections sockets were open
	ReasonMaxPending     = "max_pending_per_address" // MaxPendingPerAddress sockets from the address not yet connected
	ReasonConnectTimeout = "connect_timeout"         // handshake done, no CONNECT before the deadline
	ReasonNoConnect      = "no_connect"              // handshake done, closed before CONNECT
	ReasonProtocol       = "protocol"                // malformed or unsupported CONNECT (MQTT 3.1 included)

	// TLS handshake.
	ReasonTimeout          = "timeout"           // no handshake before the deadline
	ReasonClosed           = "closed"            // peer went away mid-handshake
	ReasonNoCertificate    = "no_certificate"    // client sent no certificate
	ReasonUnknownAuthority = "unknown_authority" // certificate not from the fleet CA
	ReasonCertExpired      = "cert_expired"      // certificate outside its validity period
	ReasonCertInvalid      = "cert_invalid"      // any other verification failure
	ReasonTLS              = "tls"               // protocol errors, client alerts

	// Identity, checked in the handshake and again at CONNECT.
	ReasonRevoked         = "revoked"          // identity or certificate revoked
	ReasonUnknownIdentity = "unknown_identity" // CN not in the store
	ReasonCertUnknown     = "cert_unknown"     // serial not in the store
	ReasonCertMismatch    = "cert_mismatch"    // stored certificate belongs to another identity or differs
	ReasonStore           = "store_error"      // the store could not answer

	// CONNECT.
	ReasonClientID = "client_id"   // client id is not the certificate CN
	ReasonRole     = "role"        // the identity's role has no MQTT access
	ReasonWill     = "will_denied" // the will topic is not one the identity may publish to
	// An MQTT 5 Authentication Method: the certificate is the only
	// authentication, and MQTT 5 (4.12) says to close such a connection.
	ReasonAuthMethod = "auth_method"
)

// Reasons a live session is closed by the broker: the keys of Stats.Kicked.
const (
	KickRevoked     = "revoked"      // Revoke
	KickCertExpired = "cert_expired" // the session outlived its certificate
	// A write to the client blocked for WriteTimeout: it stopped reading.
	KickWriteTimeout = "write_timeout"
)

// Stats is a snapshot of the broker's counters. Counters count since New;
// gauges (Open…, Sessions) are current values.
type Stats struct {
	OpenConnections   int               // sockets open now, handshaken or not
	Sessions          int               // authorized MQTT connections now
	Accepted          uint64            // sockets accepted
	AcceptErrors      uint64            // Accept errors, retried
	Resumed           uint64            // TLS handshakes that resumed a session (ticket)
	SessionsTotal     uint64            // MQTT connections authorized
	Refused           map[string]uint64 // connections refused before a session, by Reason…
	HandshakeFailures map[string]uint64 // TLS handshakes failed, by Reason…
	Kicked            map[string]uint64 // sessions closed by the broker, by Kick…
	ACLDenied         uint64            // publishes, subscriptions and deliveries denied
	SubscriptionLimit uint64            // subscriptions refused over the per-client limit
	RateLimited       uint64            // publishes refused by the rate limit
	Delayed           uint64            // MQTT 3.1.1 publishes held until the rate limit let them in
	MessagesIn        [3]uint64         // PUBLISH received from clients, by QoS
	MessagesOut       [3]uint64         // PUBLISH sent to clients, by QoS
	TelemetryStored   uint64            // telemetry messages committed to the store
	TelemetryCommits  uint64            // AppendTelemetry calls that succeeded (stored/commits = batch size)
	TelemetryTooLarge uint64            // telemetry refused for its payload size
	TelemetryDropped  uint64            // QoS 0 telemetry dropped: the writer's queue stayed full (store stuck)
	TelemetryFailed   uint64            // telemetry the store failed to write
	FollowDropped     uint64            // messages not delivered to a slow Follow reader
	// Deliveries to subscribers that mochi dropped: the subscriber had
	// WriteQueue packets waiting to be written (connected but reading too
	// slowly), or, for QoS 1/2, its session already held MaxInflight
	// unacknowledged messages (mostly a kept session whose client is away).
	DeliveriesDroppedQueueFull    uint64
	DeliveriesDroppedInflightFull uint64
	PresenceFailed                uint64 // presence updates the store failed to write
}

var (
	refusalReasons = []string{
		ReasonMaxConnections, ReasonMaxPending, ReasonConnectTimeout, ReasonNoConnect, ReasonProtocol,
		ReasonRevoked, ReasonUnknownIdentity, ReasonCertUnknown, ReasonCertMismatch, ReasonStore,
		ReasonNoCertificate, ReasonClientID, ReasonRole, ReasonWill, ReasonAuthMethod,
	}
	handshakeReasons = []string{
		ReasonTimeout, ReasonClosed, ReasonNoCertificate, ReasonUnknownAuthority,
		ReasonCertExpired, ReasonCertInvalid, ReasonTLS,
		ReasonRevoked, ReasonUnknownIdentity, ReasonCertUnknown, ReasonCertMismatch, ReasonStore,
	}
	kickReasons = []string{KickRevoked, KickCertExpired, KickWriteTimeout}
)

// counterSet is a fixed set of named counters; its map is never written
// after creation, so lookups need no lock.
type counterSet map[string]*atomic.Uint64

func newCounterSet(keys []string) counterSet {
	s := make(counterSet, len(keys))
	for _, k := range keys {
		s[k] = new(atomic.Uint64)
	}
	return s
}

func (s counterSet) inc(key string) {
	if c, ok := s[key]; ok {
		c.Add(1)
	}
}

func (s counterSet) snapshot() map[string]uint64 {
	m := make(map[string]uint64, len(s))
	for k, c := range s {
		m[k] = c.Load()
	}
	return m
}

// counters are the broker's live counters; Stats copies them.
type counters struct {
	accepted, acceptErrors, resumed, sessionsTotal atomic.Uint64
	aclDenied, subLimit, rateLimited, delayed      atomic.Uint64
	in, out                                        [3]atomic.Uint64
	stored, commits, tooLarge, dropped, failed     atomic.Uint64
	followDropped, presenceFailed, deliveryDropped atomic.Uint64

	refused, handshake, kicked counterSet
}

func newCounters() *counters {
	return &counters{
		refused:   newCounterSet(refusalReasons),
		handshake: newCounterSet(handshakeReasons),
		kicked:    newCounterSet(kickReasons),
	}
}

func (c *counters) snapshot() Stats {
	s := Stats{
		Accepted:                   c.accepted.Load(),
		AcceptErrors:               c.acceptErrors.Load(),
		Resumed:                    c.resumed.Load(),
		SessionsTotal:              c.sessionsTotal.Load(),
		Refused:                    c.refused.snapshot(),
		HandshakeFailures:          c.handshake.snapshot(),
		Kicked:                     c.kicked.snapshot(),
		ACLDenied:                  c.aclDenied.Load(),
		SubscriptionLimit:          c.subLimit.Load(),
		RateLimited:                c.rateLimited.Load(),
		Delayed:                    c.delayed.Load(),
		TelemetryStored:            c.stored.Load(),
		TelemetryCommits:           c.commits.Load(),
		TelemetryTooLarge:          c.tooLarge.Load(),
		TelemetryDropped:           c.dropped.Load(),
		TelemetryFailed:            c.failed.Load(),
		FollowDropped:              c.followDropped.Load(),
		DeliveriesDroppedQueueFull: c.deliveryDropped.Load(),
		PresenceFailed:             c.presenceFailed.Load(),
	}
	for q := range s.MessagesIn {
		s.MessagesIn[q] = c.in[q].Load()
		s.MessagesOut[q] = c.out[q].Load()
	}
	return s
}
