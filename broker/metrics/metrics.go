// Package metrics exposes a fleetmq node to Prometheus, with /healthz and
// /readyz beside /metrics.
//
// Most values are read when Prometheus scrapes: the broker's counters
// (broker.Stats), the identities connected now and, cached for a few
// seconds, the identities in the store. Only what has no other home is
// counted here, through hooks the node wires in: enrollment and renewal
// outcomes (enroll.Config.Observe), revocations (admin.Config.Observe) and
// store commit latency (store.Options.OnCommit). Each hook does
// constant-time work. No metric carries a device id, so the number of
// series does not grow with the fleet.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/broker"
	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// Config configures Metrics. Zero values mean the defaults named.
type Config struct {
	// Stats returns the broker's counters. Required.
	Stats func() broker.Stats
	// Online lists the identities connected to this node. Required.
	Online func() []string
	// Devices lists every identity; it is called at most once per CacheFor
	// (and again when a connected identity is missing from its answer).
	// Required.
	Devices func(ctx context.Context) ([]store.Device, error)
	// Ready reports whether the node can serve; /readyz answers 503 with
	// its error. Default: always ready.
	Ready func(ctx context.Context) error
	// ExpiryWindow is how close to expiry a certificate counts as expiring
	// soon. Default 7 days.
	ExpiryWindow time.Duration
	// CacheFor is how long the identity list read from the store is
	// reused across scrapes. Default 5s.
	CacheFor time.Duration
	// Logger receives scrape errors. Default zerolog.Nop().
	Logger zerolog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Metrics is a node's Prometheus registry and the hooks that feed it.
type Metrics struct {
	cfg Config
	reg *prometheus.Registry

	enrollments *prometheus.CounterVec
	renewals    *prometheus.CounterVec
	revocations *prometheus.CounterVec
	commitDur   prometheus.Histogram
	commitSize  prometheus.Histogram
	commitFail  prometheus.Counter
	// enrollLimited counts enrollments and renewals refused with 429, for
	// fleetmq_rate_limited_total beside the broker's publish limit.
	enrollLimited atomic.Uint64

	fleet *fleetCache
}

// New returns the metrics of a node; nothing is served until Handler.
func New(cfg Config) (*Metrics, error) {
	if cfg.Stats == nil || cfg.Online == nil || cfg.Devices == nil {
		return nil, errors.New("metrics: config needs Stats, Online and Devices")
	}
	if cfg.Ready == nil {
		cfg.Ready = func(context.Context) error { return nil }
	}
	if cfg.ExpiryWindow == 0 {
		cfg.ExpiryWindow = 7 * 24 * time.Hour
	}
	if cfg.CacheFor == 0 {
		cfg.CacheFor = 5 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	m := &Metrics{
		cfg: cfg,
		reg: prometheus.NewRegistry(),
		enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmq_enrollments_total",
			Help: "Enrollment requests (HTTPS and EST) by result: ok or the public error code.",
		}, []string{"result"}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmq_renewals_total",
			Help: "Certificate renewal requests (HTTPS and EST) by result: ok or the public error code.",
		}, []string{"result"}),
		revocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmq_revocations_total",
			Help: "Revocations of devices and tokens by result: ok or the public error code.",
		}, []string{"kind", "result"}),
		commitDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "fleetmq_store_commit_duration_seconds",
			Help: "Duration of the store's group commits, fsync included.",
			// 100µs to ~1.6s: an SSD commits in well under a millisecond,
			// an SD card may take hundreds.
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 15),
		}),
		commitSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fleetmq_store_commit_requests",
			Help:    "Write requests grouped in one store commit.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11), // 1 to 1024, the store's largest group
		}),
		commitFail: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetmq_store_commit_failures_total",
			Help: "Store commits that failed (disk full, I/O error): every write in them was refused.",
		}),
	}
	m.fleet = &fleetCache{load: cfg.Devices, now: cfg.Now, ttl: cfg.CacheFor}
	// Series that exist from the start: a rate over a series that appears
	// with its first increment misses that increment.
	m.enrollments.WithLabelValues(resultOK)
	m.renewals.WithLabelValues(resultOK)
	m.revocations.WithLabelValues(kindDevice, resultOK)
	m.revocations.WithLabelValues(kindToken, resultOK)

	for _, c := range []prometheus.Collector{
		m.enrollments, m.renewals, m.revocations, m.commitDur, m.commitSize, m.commitFail,
		&collector{m: m},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := m.reg.Register(c); err != nil {
			return nil, fmt.Errorf("metrics: register: %w", err)
		}
	}
	return m, nil
}

const (
	resultOK   = "ok"
	kindDevice = "device"
	kindToken  = "token"
)

// ObserveEnroll counts one enrollment or renewal request; it is
// enroll.Config.Observe.
func (m *Metrics) ObserveEnroll(op, result string) {
	if result == string(enroll.CodeRateLimited) {
		m.enrollLimited.Add(1)
	}
	switch op {
	case enroll.OpEnroll:
		m.enrollments.WithLabelValues(result).Inc()
	case enroll.OpRenew:
		m.renewals.WithLabelValues(result).Inc()
	}
}

// ObserveAdmin counts one revocation; it is admin.Config.Observe.
func (m *Metrics) ObserveAdmin(op, result string) {
	switch op {
	case admin.OpRevokeDevice:
		m.revocations.WithLabelValues(kindDevice, result).Inc()
	case admin.OpRevokeToken:
		m.revocations.WithLabelValues(kindToken, result).Inc()
	}
}

// ObserveCommit records one store commit; it is store.Options.OnCommit.
func (m *Metrics) ObserveCommit(d time.Duration, requests int, err error) {
	m.commitDur.Observe(d.Seconds())
	m.commitSize.Observe(float64(requests))
	if err != nil {
		m.commitFail.Inc()
	}
}

// Registry is the registry behind Handler, for tests and embedding.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves GET /metrics, /healthz (the process answers) and /readyz
// (Config.Ready).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		// A failing store read drops its gauges, not the whole scrape.
		ErrorHandling:       promhttp.ContinueOnError,
		ErrorLog:            promLogger{m.cfg.Logger},
		MaxRequestsInFlight: 4,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		plain(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if err := m.cfg.Ready(ctx); err != nil {
			plain(w, http.StatusServiceUnavailable, "not ready: "+err.Error())
			return
		}
		plain(w, http.StatusOK, "ready")
	})
	return mux
}

func plain(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	fmt.Fprintln(w, msg)
}

type promLogger struct{ l zerolog.Logger }

func (p promLogger) Println(v ...any) { p.l.Warn().Msg(fmt.Sprint(v...)) }

// fleetCache keeps the identity list between scrapes: reading and decoding
// every identity on each scrape would cost the store more than the scrape
// is worth.
type fleetCache struct {
	load func(context.Context) ([]store.Device, error)
	now  func() time.Time
	ttl  time.Duration

	mu      sync.Mutex
	at      time.Time
	devices map[string]store.Device
}

// get returns the identities, reloading them when the cache is older than
// its ttl or lacks one of need.
func (c *fleetCache) get(ctx context.Context, need []string) (map[string]store.Device, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fresh := c.devices != nil && c.now().Sub(c.at) < c.ttl
	for _, id := range need {
		if !fresh {
			break
		}
		_, fresh = c.devices[id]
	}
	if fresh {
		return c.devices, nil
	}
	devs, err := c.load(ctx)
	if err != nil {
		return nil, err
	}
	m := make(map[string]store.Device, len(devs))
	for _, d := range devs {
		m[d.ID] = d
	}
	c.devices, c.at = m, c.now()
	return m, nil
}

var (
	descConnected = prometheus.NewDesc("fleetmq_connected_devices",
		"Identities with an authorized MQTT session on this node, by role.", []string{"role"}, nil)
	descOpen = prometheus.NewDesc("fleetmq_mqtt_open_connections",
		"MQTT sockets open now, TLS handshake done or not.", nil, nil)
	descAccepted = prometheus.NewDesc("fleetmq_mqtt_accepted_connections_total",
		"MQTT sockets accepted.", nil, nil)
	descHandshake = prometheus.NewDesc("fleetmq_tls_handshake_failures_total",
		"Failed MQTT TLS handshakes by reason (no_certificate, unknown_authority, cert_expired, revoked, ...).", []string{"reason"}, nil)
	descRefused = prometheus.NewDesc("fleetmq_mqtt_connect_refusals_total",
		"MQTT connections refused before a session by reason (client_id, role, revoked, max_connections, ...).", []string{"reason"}, nil)
	descKicked = prometheus.NewDesc("fleetmq_mqtt_sessions_closed_total",
		"Live MQTT sessions closed by the broker by reason (revoked, cert_expired, write_timeout).", []string{"reason"}, nil)
	descACL = prometheus.NewDesc("fleetmq_mqtt_acl_denials_total",
		"Publishes, subscriptions and deliveries denied by the topic ACL.", nil, nil)
	descIn = prometheus.NewDesc("fleetmq_mqtt_messages_received_total",
		"PUBLISH packets received from clients and past the ACL, by QoS.", []string{"qos"}, nil)
	descOut = prometheus.NewDesc("fleetmq_mqtt_messages_sent_total",
		"PUBLISH packets sent to clients, by QoS.", []string{"qos"}, nil)
	descStored = prometheus.NewDesc("fleetmq_telemetry_stored_total",
		"Telemetry messages committed to the store.", nil, nil)
	descTelemetryLost = prometheus.NewDesc("fleetmq_telemetry_rejected_total",
		"Telemetry messages not stored, by reason (too_large, queue_full, store_error).", []string{"reason"}, nil)
	descRateLimited = prometheus.NewDesc("fleetmq_rate_limited_total",
		"Requests refused by a rate limit: mqtt_publish (per-identity publish rate) or enrollment (HTTP 429).", []string{"limit"}, nil)
	descDelayed = prometheus.NewDesc("fleetmq_mqtt_publishes_delayed_total",
		"MQTT 3.1.1 publishes over the per-identity publish rate held until it let them in, instead of dropped.", nil, nil)
	descDeliveryDropped = prometheus.NewDesc("fleetmq_mqtt_deliveries_dropped_total",
		"Messages not delivered to a subscriber, by reason: queue_full (its write queue, 128 packets, was full: it reads too slowly), inflight_full (its kept session already held the most unacknowledged QoS 1/2 messages).", []string{"reason"}, nil)
	descDevices = prometheus.NewDesc("fleetmq_devices",
		"Identities in the store by role and state (active, revoked).", []string{"role", "state"}, nil)
	descExpiring = prometheus.NewDesc("fleetmq_devices_expiring_soon",
		"Identities not revoked whose certificate expires within the expiry window (7 days by default), already expired ones included, by role.", []string{"role"}, nil)
)

var roles = []store.Role{store.RoleDevice, store.RoleService, store.RoleOperator}

// collector reads the node's state at scrape time.
type collector struct{ m *Metrics }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descConnected, descOpen, descAccepted, descHandshake, descRefused, descKicked, descACL,
		descIn, descOut, descStored, descTelemetryLost, descRateLimited, descDelayed, descDeliveryDropped, descDevices, descExpiring,
	} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	cfg := c.m.cfg
	s := cfg.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(descOpen, float64(s.OpenConnections))
	counter(descAccepted, s.Accepted)
	for reason, v := range s.HandshakeFailures {
		counter(descHandshake, v, reason)
	}
	for reason, v := range s.Refused {
		counter(descRefused, v, reason)
	}
	for reason, v := range s.Kicked {
		counter(descKicked, v, reason)
	}
	counter(descACL, s.ACLDenied)
	for q := range s.MessagesIn {
		counter(descIn, s.MessagesIn[q], strconv.Itoa(q))
		counter(descOut, s.MessagesOut[q], strconv.Itoa(q))
	}
	counter(descStored, s.TelemetryStored)
	counter(descTelemetryLost, s.TelemetryTooLarge, "too_large")
	counter(descTelemetryLost, s.TelemetryDropped, "queue_full")
	counter(descTelemetryLost, s.TelemetryFailed, "store_error")
	counter(descRateLimited, s.RateLimited, "mqtt_publish")
	counter(descRateLimited, c.m.enrollLimited.Load(), "enrollment")
	counter(descDelayed, s.Delayed)
	counter(descDeliveryDropped, s.DeliveriesDroppedQueueFull, "queue_full")
	counter(descDeliveryDropped, s.DeliveriesDroppedInflightFull, "inflight_full")

	online := cfg.Online()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	devs, err := c.m.fleet.get(ctx, online)
	if err != nil {
		cfg.Logger.Warn().Err(err).Msg("metrics: reading identities")
		ch <- prometheus.NewInvalidMetric(descDevices, err)
		return
	}
	connected := map[store.Role]int{}
	for _, id := range online {
		// An identity missing even from a fresh list was deleted while
		// connected, which the store does not do; count it as a device.
		role := store.RoleDevice
		if d, ok := devs[id]; ok {
			role = d.Role
		}
		connected[role]++
	}
	type key struct {
		role  store.Role
		state string
	}
	counts := map[key]int{}
	expiring := map[store.Role]int{}
	soon := cfg.Now().Add(cfg.ExpiryWindow)
	for _, d := range devs {
		if d.Revoked() {
			counts[key{d.Role, "revoked"}]++
			continue
		}
		counts[key{d.Role, "active"}]++
		if d.NotAfter.Before(soon) {
			expiring[d.Role]++
		}
	}
	for _, r := range roles {
		gauge(descConnected, float64(connected[r]), string(r))
		gauge(descExpiring, float64(expiring[r]), string(r))
		gauge(descDevices, float64(counts[key{r, "active"}]), string(r), "active")
		gauge(descDevices, float64(counts[key{r, "revoked"}]), string(r), "revoked")
	}
}
