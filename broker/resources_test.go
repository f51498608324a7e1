package broker

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestSlowSubscriberDoesNotStallPublishers: a QoS 1 subscriber that stops
// reading (a stuck backend, a half-dead link) fills its socket; mochi
// writes to a client holding its lock, and every publisher delivering to it
// waits for that lock. The subscriber is disconnected after WriteTimeout,
// so the devices' PUBACKs stall for that long at most, not for the
// subscriber's keepalive.
func TestSlowSubscriberDoesNotStallPublishers(t *testing.T) {
	const writeTimeout = 500 * time.Millisecond
	f := newFixture(t, func(c *Config) {
		c.WriteTimeout = writeTimeout
		c.PublishRate, c.PublishBurst = 100000, 100000
	})

	// The subscriber's socket takes little before it stops the sender.
	sub := dialSmallBuffer(t, f.addr, f.clientTLS(f.service(t, "stuck-svc")))
	if ack := sub.connect("stuck-svc"); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	sub.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: "devices/+/telemetry", Qos: 1}},
	})
	if ack := sub.mustRead(packets.Suback); len(ack.ReasonCodes) != 1 || ack.ReasonCodes[0] != 1 {
		t.Fatalf("SUBACK %v", ack.ReasonCodes)
	}
	// From here on the subscriber reads nothing.

	dev := connect(t, f.pahoOpts("busy-dev", f.clientTLS(f.device(t, "busy-dev"))))
	payload := bytes.Repeat([]byte("x"), 60_000)
	start := time.Now()
	for i := range 300 { // 18 MB, far beyond what the stuck socket takes
		if err := wait(t, dev.Publish("devices/busy-dev/telemetry", 1, false, payload)); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	t.Logf("300 QoS 1 publishes acknowledged in %s", time.Since(start).Round(time.Millisecond))
	eventually(t, func() bool { return f.b.Stats().Kicked[KickWriteTimeout] == 1 }, "the stuck subscriber closed")
	if !strings.Contains(f.logs.String(), "stopped reading") {
		t.Errorf("no log of the stuck subscriber:\n%s", f.logs.String())
	}
}

// TestExpiredSessionReleasesSubscriptions: mochi forgets an expired
// session's client but not its subscriptions, which stayed in the topic
// index for ever (memory a client could grow session after session) and
// were delivered to the next client taking the id.
func TestExpiredSessionReleasesSubscriptions(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionExpiry = time.Second })
	const topic = "devices/dev-x/telemetry"
	svc := connect(t, f.pahoOpts("svc", f.clientTLS(f.service(t, "svc"))).SetCleanSession(false))
	if err := wait(t, svc.Subscribe("devices/+/telemetry", 1, nil)); err != nil {
		t.Fatal(err)
	}
	if !f.b.hasSubscribers(topic) || f.b.nwatchers.Load() != 1 {
		t.Fatal("subscription not indexed")
	}
	svc.Disconnect(0)
	eventually(t, func() bool {
		return !f.b.hasSubscribers(topic) && f.b.nwatchers.Load() == 0
	}, "the expired session's subscription removed")
}
