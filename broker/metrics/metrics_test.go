package metrics_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker"
	"github.com/fleetmq/fleetmq/broker/metrics"
	"github.com/fleetmq/fleetmq/broker/metrics/metricstest"
	"github.com/fleetmq/fleetmq/store"
)

// fakeNode is the state a Metrics reads, under the test's control.
type fakeNode struct {
	mu       sync.Mutex
	now      time.Time
	stats    broker.Stats
	online   []string
	devices  []store.Device
	loads    int
	loadErr  error
	readyErr error
}

func (f *fakeNode) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeNode) set(fn func(*fakeNode)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeNode) config() metrics.Config {
	return metrics.Config{
		Stats: func() broker.Stats {
			f.mu.Lock()
			defer f.mu.Unlock()
			return f.stats
		},
		Online: func() []string {
			f.mu.Lock()
			defer f.mu.Unlock()
			return append([]string(nil), f.online...)
		},
		Devices: func(context.Context) ([]store.Device, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.loads++
			return append([]store.Device(nil), f.devices...), f.loadErr
		},
		Ready: func(context.Context) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			return f.readyErr
		},
		Now: f.Now,
	}
}

func (f *fakeNode) loadCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.loads
}

func serve(tb testing.TB, m *metrics.Metrics) string {
	tb.Helper()
	srv := httptest.NewServer(m.Handler())
	tb.Cleanup(srv.Close)
	return srv.URL
}

func TestScrapeReadsNodeState(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	f := &fakeNode{
		now: now,
		stats: broker.Stats{
			OpenConnections:               3,
			Accepted:                      10,
			HandshakeFailures:             map[string]uint64{broker.ReasonNoCertificate: 2, broker.ReasonUnknownAuthority: 1, broker.ReasonRevoked: 0},
			Refused:                       map[string]uint64{broker.ReasonClientID: 4},
			Kicked:                        map[string]uint64{broker.KickRevoked: 1},
			ACLDenied:                     5,
			RateLimited:                   6,
			MessagesIn:                    [3]uint64{1, 2, 3},
			MessagesOut:                   [3]uint64{4, 5, 6},
			TelemetryStored:               7,
			TelemetryTooLarge:             1,
			TelemetryDropped:              2,
			TelemetryFailed:               3,
			DeliveriesDroppedQueueFull:    8,
			DeliveriesDroppedInflightFull: 9,
		},
		online: []string{"pi-1", "svc-1"},
		devices: []store.Device{
			{ID: "pi-1", Role: store.RoleDevice, NotAfter: now.Add(30 * 24 * time.Hour)},
			{ID: "pi-2", Role: store.RoleDevice, NotAfter: now.Add(6 * 24 * time.Hour)},
			{ID: "pi-3", Role: store.RoleDevice, NotAfter: now.Add(-time.Hour)}, // expired, not revoked
			{ID: "pi-4", Role: store.RoleDevice, NotAfter: now.Add(time.Hour), RevokedAt: now},
			{ID: "svc-1", Role: store.RoleService, NotAfter: now.Add(300 * 24 * time.Hour)},
			{ID: "ops", Role: store.RoleOperator, NotAfter: now.Add(2 * 24 * time.Hour)},
		},
	}
	m, err := metrics.New(f.config())
	if err != nil {
		t.Fatal(err)
	}
	m.ObserveEnroll("enroll", "ok")
	m.ObserveEnroll("enroll", "ok")
	m.ObserveEnroll("enroll", "token_used")
	m.ObserveEnroll("enroll", "rate_limited")
	m.ObserveEnroll("renew", "rate_limited")
	m.ObserveEnroll("renew", "ok")
	m.ObserveAdmin("revoke_device", "ok")
	m.ObserveAdmin("revoke_device", "device_revoked")
	m.ObserveAdmin("revoke_token", "not_found")
	m.ObserveCommit(2*time.Millisecond, 4, nil)
	m.ObserveCommit(time.Millisecond, 1, nil)
	m.ObserveCommit(time.Millisecond, 2, errors.New("no space left on device"))
	url := serve(t, m)

	fams := metricstest.Scrape(t, url+"/metrics")
	for _, c := range []struct {
		want   float64
		name   string
		labels []string
	}{
		{3, "fleetmq_mqtt_open_connections", nil},
		{10, "fleetmq_mqtt_accepted_connections_total", nil},
		{2, "fleetmq_tls_handshake_failures_total", []string{"reason", "no_certificate"}},
		{1, "fleetmq_tls_handshake_failures_total", []string{"reason", "unknown_authority"}},
		{0, "fleetmq_tls_handshake_failures_total", []string{"reason", "revoked"}},
		{4, "fleetmq_mqtt_connect_refusals_total", []string{"reason", "client_id"}},
		{1, "fleetmq_mqtt_sessions_closed_total", []string{"reason", "revoked"}},
		{5, "fleetmq_mqtt_acl_denials_total", nil},
		{1, "fleetmq_mqtt_messages_received_total", []string{"qos", "0"}},
		{3, "fleetmq_mqtt_messages_received_total", []string{"qos", "2"}},
		{5, "fleetmq_mqtt_messages_sent_total", []string{"qos", "1"}},
		{8, "fleetmq_mqtt_deliveries_dropped_total", []string{"reason", "queue_full"}},
		{9, "fleetmq_mqtt_deliveries_dropped_total", []string{"reason", "inflight_full"}},
		{7, "fleetmq_telemetry_stored_total", nil},
		{1, "fleetmq_telemetry_rejected_total", []string{"reason", "too_large"}},
		{2, "fleetmq_telemetry_rejected_total", []string{"reason", "queue_full"}},
		{3, "fleetmq_telemetry_rejected_total", []string{"reason", "store_error"}},
		{6, "fleetmq_rate_limited_total", []string{"limit", "mqtt_publish"}},
		{2, "fleetmq_rate_limited_total", []string{"limit", "enrollment"}},
		{2, "fleetmq_enrollments_total", []string{"result", "ok"}},
		{1, "fleetmq_enrollments_total", []string{"result", "token_used"}},
		{1, "fleetmq_renewals_total", []string{"result", "ok"}},
		{1, "fleetmq_revocations_total", []string{"kind", "device", "result", "ok"}},
		{1, "fleetmq_revocations_total", []string{"kind", "device", "result", "device_revoked"}},
		{0, "fleetmq_revocations_total", []string{"kind", "token", "result", "ok"}},
		{1, "fleetmq_revocations_total", []string{"kind", "token", "result", "not_found"}},
		{3, "fleetmq_store_commit_duration_seconds", nil},
		{3, "fleetmq_store_commit_requests", nil},
		{1, "fleetmq_store_commit_failures_total", nil},
		{1, "fleetmq_connected_devices", []string{"role", "device"}},
		{1, "fleetmq_connected_devices", []string{"role", "service"}},
		{0, "fleetmq_connected_devices", []string{"role", "operator"}},
		{3, "fleetmq_devices", []string{"role", "device", "state", "active"}},
		{1, "fleetmq_devices", []string{"role", "device", "state", "revoked"}},
		{1, "fleetmq_devices", []string{"role", "operator", "state", "active"}},
		{2, "fleetmq_devices_expiring_soon", []string{"role", "device"}},
		{0, "fleetmq_devices_expiring_soon", []string{"role", "service"}},
		{1, "fleetmq_devices_expiring_soon", []string{"role", "operator"}},
	} {
		fams.Want(t, c.want, c.name, c.labels...)
	}
	// The commit histogram has its observations in the right buckets.
	h := fams["fleetmq_store_commit_duration_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleSum() < 0.0039 || h.GetSampleSum() > 0.0041 {
		t.Errorf("commit duration sum %v, want 0.004", h.GetSampleSum())
	}
	// The Go runtime and process collectors are in.
	if _, ok := fams["go_goroutines"]; !ok {
		t.Error("no go_goroutines")
	}
	// No series names a device.
	for name, fam := range fams {
		for _, m := range fam.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.HasPrefix(l.GetValue(), "pi-") || l.GetValue() == "svc-1" {
					t.Errorf("%s has a label naming an identity: %s=%s", name, l.GetName(), l.GetValue())
				}
			}
		}
	}
}

func TestIdentitiesCached(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	f := &fakeNode{now: now, devices: []store.Device{{ID: "pi-1", Role: store.RoleDevice, NotAfter: now.Add(time.Hour)}}}
	cfg := f.config()
	cfg.CacheFor = 10 * time.Second
	m, err := metrics.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	url := serve(t, m)

	metricstest.Scrape(t, url+"/metrics").Want(t, 1, "fleetmq_devices", "role", "device", "state", "active")
	f.set(func(f *fakeNode) {
		f.devices = append(f.devices, store.Device{ID: "pi-2", Role: store.RoleDevice, NotAfter: now.Add(time.Hour)})
		f.now = now.Add(5 * time.Second)
	})
	metricstest.Scrape(t, url+"/metrics").Want(t, 1, "fleetmq_devices", "role", "device", "state", "active")
	if n := f.loadCount(); n != 1 {
		t.Fatalf("identities loaded %d times within CacheFor, want once", n)
	}
	// A connected identity the cache does not know makes it reload.
	f.set(func(f *fakeNode) { f.online = []string{"pi-2"} })
	fams := metricstest.Scrape(t, url+"/metrics")
	fams.Want(t, 2, "fleetmq_devices", "role", "device", "state", "active")
	fams.Want(t, 1, "fleetmq_connected_devices", "role", "device")
	if n := f.loadCount(); n != 2 {
		t.Fatalf("identities loaded %d times, want a reload for the unknown connected id", n)
	}
	// Past CacheFor the list is read again.
	f.set(func(f *fakeNode) {
		f.devices[0].RevokedAt = now
		f.now = now.Add(20 * time.Second)
	})
	metricstest.Scrape(t, url+"/metrics").Want(t, 1, "fleetmq_devices", "role", "device", "state", "revoked")
	if n := f.loadCount(); n != 3 {
		t.Fatalf("identities loaded %d times, want 3", n)
	}
}

func TestStoreErrorKeepsTheRest(t *testing.T) {
	f := &fakeNode{now: time.Now(), loadErr: errors.New("disk on fire"), stats: broker.Stats{ACLDenied: 9}}
	m, err := metrics.New(f.config())
	if err != nil {
		t.Fatal(err)
	}
	fams := metricstest.Scrape(t, serve(t, m)+"/metrics")
	fams.Want(t, 9, "fleetmq_mqtt_acl_denials_total")
	if _, ok := fams["fleetmq_devices"]; ok {
		t.Error("identity gauges served although the store failed")
	}
}

func TestHealthAndReadiness(t *testing.T) {
	f := &fakeNode{now: time.Now()}
	m, err := metrics.New(f.config())
	if err != nil {
		t.Fatal(err)
	}
	url := serve(t, m)
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(url + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := get("/readyz"); code != 200 || body != "ready\n" {
		t.Errorf("/readyz: %d %q", code, body)
	}
	f.set(func(f *fakeNode) { f.readyErr = errors.New("shutting down") })
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "shutting down") {
		t.Errorf("/readyz not ready: %d %q", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz while not ready: %d", code)
	}
	if code, _ := get("/nope"); code != 404 {
		t.Errorf("/nope: %d", code)
	}
	resp, err := http.Post(url+"/metrics", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics: %d", resp.StatusCode)
	}
}

func TestNewNeedsSources(t *testing.T) {
	if _, err := metrics.New(metrics.Config{}); err == nil {
		t.Fatal("New accepted a config without sources")
	}
}
