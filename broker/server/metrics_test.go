package server_test

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetmq/fleetmq/broker/metrics/metricstest"
	"github.com/fleetmq/fleetmq/broker/server"
)

// until polls cond every few milliseconds until it holds, failing the test
// with what describe says after 10 seconds.
func until(tb testing.TB, cond func() bool, describe func() string) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting: %s", describe())
		}
		<-tick.C
	}
}

func getStatus(tb testing.TB, url string) (int, string) {
	tb.Helper()
	resp, err := http.Get(url)
	if err != nil {
		tb.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestMetricsScenario scrapes a real node after a scripted scenario: an
// enrollment, a refused one, one refused by the rate limit, a device on
// MQTT with telemetry, an ACL denial, a rate-limited publish, a handshake
// without certificate, a CONNECT with a foreign client id, a revocation.
func TestMetricsScenario(t *testing.T) {
	s := startServer(t, func(c *server.Config) {
		c.MetricsAddr = "127.0.0.1:0"
		c.CertLifetime = 3 * 24 * time.Hour // inside the 7-day expiry window
		c.Broker.PublishRate = 0.0001       // the burst is all there is
		c.Broker.PublishBurst = 3
		c.Enroll.FailureBurst = 1
		c.Enroll.FailureRate = 0.0001
	})
	base := "http://" + s.MetricsAddr().String()
	if code, body := getStatus(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, body := getStatus(t, base+"/readyz"); code != 200 || body != "ready\n" {
		t.Fatalf("/readyz: %d %q", code, body)
	}
	scrape := func() metricstest.Families { return metricstest.Scrape(t, base+"/metrics") }

	d := s.enroll(t, s.token(t), "pi-m1")
	if a := s.post(t, s.client(nil), "/v1/enroll", bearer("not-a-token"), csrPEM(t, newKey(t), "pi-m2")); a.status != 401 {
		t.Fatalf("bad token: %d", a.status)
	}
	if a := s.post(t, s.client(nil), "/v1/enroll", bearer("not-a-token"), csrPEM(t, newKey(t), "pi-m2")); a.status != 429 {
		t.Fatalf("over the failure limit: %d", a.status)
	}

	lost := make(chan error, 1)
	c := pahoClient(t, s, d, "pi-m1", lost)
	defer c.Disconnect(0)
	// Another device's commands: the SUBACK refuses the filter.
	sub := c.Subscribe("devices/pi-other/commands/#", 1, nil)
	if !sub.WaitTimeout(10*time.Second) || sub.Error() != nil {
		t.Fatalf("subscribe: %v", sub.Error())
	}
	if code := sub.(*paho.SubscribeToken).Result()["devices/pi-other/commands/#"]; code != 0x80 {
		t.Fatalf("foreign subscription granted: %#x", code)
	}
	for _, p := range []string{`{"cpu_temp_c":40}`, `{"cpu_temp_c":41}`} {
		tok := c.Publish("devices/pi-m1/telemetry", 1, false, p)
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
	}
	// The third publish takes the last token of the burst; the fourth is
	// over the limit (QoS 0: dropped without an answer).
	for range 2 {
		if tok := c.Publish("devices/pi-m1/telemetry", 0, false, `{"cpu_temp_c":42}`); !tok.WaitTimeout(10 * time.Second) {
			t.Fatal("QoS 0 publish not sent")
		}
	}
	// A handshake without a client certificate.
	conn, err := tls.Dial("tcp", s.MQTTAddr().String(), &tls.Config{RootCAs: s.CA().Pool()})
	if err == nil {
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("handshake without certificate accepted")
	}
	// A CONNECT whose client id is not the certificate's CN.
	opts := paho.NewClientOptions().AddBroker("tls://" + s.MQTTAddr().String()).SetClientID("pi-m2").
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).
		SetTLSConfig(&tls.Config{RootCAs: s.CA().Pool(), Certificates: []tls.Certificate{*d.tlsCert()}})
	if tok := paho.NewClient(opts).Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() == nil {
		t.Fatal("CONNECT with a foreign client id accepted")
	}

	// QoS 0 telemetry is stored asynchronously, and the server counts the
	// handshake after it has answered it.
	var fams metricstest.Families
	until(t, func() bool {
		fams = scrape()
		stored, _ := fams.Value("fleetmq_telemetry_stored_total")
		hs, _ := fams.Value("fleetmq_tls_handshake_failures_total", "reason", "no_certificate")
		limited, _ := fams.Value("fleetmq_rate_limited_total", "limit", "mqtt_publish")
		return stored == 3 && hs == 1 && limited == 1
	}, func() string {
		return "stored " + fams.Describe("fleetmq_telemetry_stored_total") + ", handshakes " +
			fams.Describe("fleetmq_tls_handshake_failures_total") + ", rate limited " + fams.Describe("fleetmq_rate_limited_total")
	})
	for _, c := range []struct {
		want   float64
		name   string
		labels []string
	}{
		{1, "fleetmq_enrollments_total", []string{"result", "ok"}},
		{1, "fleetmq_enrollments_total", []string{"result", "token_invalid"}},
		{1, "fleetmq_enrollments_total", []string{"result", "rate_limited"}},
		{0, "fleetmq_renewals_total", []string{"result", "ok"}},
		{1, "fleetmq_rate_limited_total", []string{"limit", "enrollment"}},
		{1, "fleetmq_connected_devices", []string{"role", "device"}},
		{1, "fleetmq_mqtt_connect_refusals_total", []string{"reason", "client_id"}},
		{0, "fleetmq_mqtt_connect_refusals_total", []string{"reason", "revoked"}},
		{1, "fleetmq_mqtt_acl_denials_total", nil},
		{2, "fleetmq_mqtt_messages_received_total", []string{"qos", "1"}},
		{2, "fleetmq_mqtt_messages_received_total", []string{"qos", "0"}},
		{0, "fleetmq_tls_handshake_failures_total", []string{"reason", "unknown_authority"}},
		{1, "fleetmq_devices", []string{"role", "device", "state", "active"}},
		{1, "fleetmq_devices_expiring_soon", []string{"role", "device"}},
		{0, "fleetmq_revocations_total", []string{"kind", "device", "result", "ok"}},
	} {
		fams.Want(t, c.want, c.name, c.labels...)
	}
	if n, ok := fams.Value("fleetmq_store_commit_duration_seconds"); !ok || n < 3 {
		t.Errorf("store commits observed: %v", n)
	}

	// Revocation: counted, the session closed, the device disconnected.
	if _, errs, code := s.cli(t, "device", "revoke", "pi-m1"); code != 0 {
		t.Fatalf("revoke: %s", errs)
	}
	if _, _, code := s.cli(t, "device", "revoke", "pi-m1"); code != 1 {
		t.Fatal("second revocation succeeded")
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("revoked device still connected")
	}
	until(t, func() bool {
		fams = scrape()
		n, _ := fams.Value("fleetmq_connected_devices", "role", "device")
		return n == 0
	}, func() string { return fams.Describe("fleetmq_connected_devices") })
	fams.Want(t, 1, "fleetmq_revocations_total", "kind", "device", "result", "ok")
	fams.Want(t, 1, "fleetmq_revocations_total", "kind", "device", "result", "device_revoked")
	fams.Want(t, 1, "fleetmq_mqtt_sessions_closed_total", "reason", "revoked")

	// No metric names a device.
	for name, fam := range fams {
		for _, m := range fam.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.Contains(l.GetValue(), "pi-m") {
					t.Errorf("%s has a label naming a device: %s", name, l.GetValue())
				}
			}
		}
	}
}

func TestReadyzFollowsTheNode(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.MetricsAddr = "127.0.0.1:0" })
	url := "http://" + s.MetricsAddr().String() + "/readyz"
	if code, _ := getStatus(t, url); code != 200 {
		t.Fatalf("/readyz of a running node: %d", code)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(url); err == nil {
		t.Fatal("metrics listener still answers after Close")
	}
}

// TestBusyPortsFailStart: the metrics and dashboard listeners bind in
// Start, so a taken port is an error there, and Close still cleans up.
func TestBusyPortsFailStart(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	for name, mod := range map[string]func(*server.Config){
		"metrics": func(c *server.Config) { c.MetricsAddr = taken.Addr().String() },
		"ui":      func(c *server.Config) { c.MetricsAddr = "127.0.0.1:0"; c.UIAddr = taken.Addr().String() },
	} {
		cfg := server.Config{DataDir: t.TempDir(), EnrollAddr: "127.0.0.1:0", MQTTAddr: "127.0.0.1:0"}
		mod(&cfg)
		srv, err := server.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		err = srv.Start()
		if err == nil || !strings.Contains(err.Error(), taken.Addr().String()) {
			t.Errorf("%s on a taken port: Start returned %v", name, err)
		}
		if err := srv.Close(); err != nil {
			t.Errorf("%s: Close after a failed Start: %v", name, err)
		}
	}
}
