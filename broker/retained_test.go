package broker

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
)

// retainStatus sets the retained status of device id as if it had
// published it; an empty payload removes it.
func (f *fixture) retainStatus(id, payload string) {
	f.b.srv.Topics.RetainMessage(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		TopicName:   statusTopic(id),
		Payload:     []byte(payload),
		Created:     time.Now().Unix(),
	})
}

func statusTopic(id string) string { return "devices/" + id + "/status" }

// A service subscribing to every device's status gets all of them,
// however large the fleet. mochi sent them in one burst and dropped what
// did not fit the write queue and in-flight table: 256 of 1,000.
func TestRetainedStatusesOfALargeFleet(t *testing.T) {
	f := newFixture(t, nil)
	const fleet = 2000
	for i := range fleet {
		f.retainStatus(fmt.Sprintf("dev-%04d", i), "online")
	}
	for _, qos := range []byte{0, 1} {
		id := fmt.Sprintf("svc-qos%d", qos)
		got := make(chan paho.Message, fleet)
		svc := connect(t, f.pahoOpts(id, f.clientTLS(f.service(t, id))))
		if err := wait(t, svc.Subscribe("devices/+/status", qos, func(_ paho.Client, m paho.Message) { got <- m })); err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for len(seen) < fleet {
			m := receive(t, got, fmt.Sprintf("QoS %d status %d of %d", qos, len(seen)+1, fleet))
			if !m.Retained() || string(m.Payload()) != "online" || seen[m.Topic()] {
				t.Fatalf("QoS %d: got %s %q (retained %v, seen before %v)", qos, m.Topic(), m.Payload(), m.Retained(), seen[m.Topic()])
			}
			seen[m.Topic()] = true
		}
	}
	if st := f.b.Stats(); st.DeliveriesDroppedQueueFull != 0 || st.DeliveriesDroppedInflightFull != 0 {
		t.Fatalf("dropped deliveries: %+v", st)
	}
}

// Retained messages follow the SUBACK, wait for acknowledgements when the
// in-flight window is full, go out as they are when their turn comes, and
// honour MQTT 5 Retain Handling.
func TestRetainedDeliveryPacing(t *testing.T) {
	f := newFixture(t, nil)
	const fleet = 300
	for i := range fleet {
		f.retainStatus(fmt.Sprintf("dev-%04d", i), "online")
	}
	r := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	if ack := r.connect("svc"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	// mochi refuses a SUBSCRIBE whose packet id one of its own messages in
	// flight has (its table holds both directions), so these ids are far
	// from the ones it numbers from 1.
	subscribe := func(packetID uint16, filter string, handling byte) {
		r.write(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
			PacketID:    60000 + packetID,
			Filters:     packets.Subscriptions{{Filter: filter, Qos: 1, RetainHandling: handling}},
		})
	}
	next := func() packets.Packet {
		t.Helper()
		pk, err := r.read()
		if err != nil {
			t.Fatal(err)
		}
		return pk
	}
	subscribe(1, "devices/+/status", 0)
	if pk := next(); pk.FixedHeader.Type != packets.Suback || pk.PacketID != 60001 {
		t.Fatalf("first packet type %d id %d, want the SUBACK", pk.FixedHeader.Type, pk.PacketID)
	}

	// Unacknowledged, the deliveries stop at half the in-flight table.
	seen := map[string]string{}
	var unacked []uint16
	for range maxInflight / 2 {
		pk := next()
		if pk.FixedHeader.Type != packets.Publish || !pk.FixedHeader.Retain || pk.FixedHeader.Qos != 1 {
			t.Fatalf("got packet type %d (retain %v, QoS %d), want a retained QoS 1 status", pk.FixedHeader.Type, pk.FixedHeader.Retain, pk.FixedHeader.Qos)
		}
		seen[pk.TopicName] = string(pk.Payload)
		unacked = append(unacked, pk.PacketID)
	}
	cl, ok := f.b.srv.Clients.Get("svc")
	if !ok {
		t.Fatal("svc is not a client")
	}
	if n := cl.State.Inflight.Len(); n != maxInflight/2 {
		t.Fatalf("%d in flight, want %d", n, maxInflight/2)
	}
	// Meanwhile one status not yet sent changes and another is removed
	// (not those of dev-0000 to dev-0002, which the test sends again).
	var changed, removed string
	for i := 3; i < fleet; i++ {
		if id := fmt.Sprintf("dev-%04d", i); seen[statusTopic(id)] == "" {
			if changed == "" {
				changed = id
			} else {
				removed = id
				break
			}
		}
	}
	f.retainStatus(changed, "offline")
	f.retainStatus(removed, "")

	// A later subscription's messages follow the first one's.
	subscribe(2, statusTopic("dev-0000"), 0)
	ack := func(id uint16) {
		r.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id})
	}
	for _, id := range unacked {
		ack(id)
	}
	for {
		pk := next()
		if pk.FixedHeader.Type != packets.Publish {
			continue // the second SUBACK
		}
		ack(pk.PacketID)
		if _, again := seen[pk.TopicName]; again {
			if pk.TopicName != statusTopic("dev-0000") || len(seen) != fleet-1 {
				t.Fatalf("%s sent twice, after %d of %d statuses", pk.TopicName, len(seen), fleet-1)
			}
			break
		}
		seen[pk.TopicName] = string(pk.Payload)
	}
	if got := seen[statusTopic(changed)]; got != "offline" {
		t.Fatalf("changed status sent as %q, want its new value", got)
	}
	if _, ok := seen[statusTopic(removed)]; ok {
		t.Fatal("removed status sent")
	}

	// Retain Handling 1 (none for an existing subscription) and 2 (none).
	subscribe(3, "devices/+/status", 1)
	subscribe(4, statusTopic("dev-0001"), 2)
	subscribe(5, statusTopic("dev-0002"), 0)
	for {
		pk := next()
		if pk.FixedHeader.Type == packets.Publish {
			if pk.TopicName != statusTopic("dev-0002") {
				t.Fatalf("got %s, want only dev-0002's status", pk.TopicName)
			}
			break
		}
	}
}

// A retained message waiting for an in-flight slot goes out as it is once
// the slot is free. It was read before the wait: a device revoked
// meanwhile had its status removed live, then the service got its old
// "online" after the removal, and kept it as the device's status.
func TestRetainedStatusNotStaleAfterRevocation(t *testing.T) {
	f := newFixture(t, nil)
	for _, id := range []string{"dev-a", "dev-b"} {
		f.device(t, id)
		f.retainStatus(id, "online")
	}
	r := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	// Half of its Receive Maximum, one message, is the retained
	// deliveries' window.
	if ack := connectWith(t, r, "svc", packets.Properties{ReceiveMaximum: 2}); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	subscribe := func(id uint16, filter string) {
		r.write(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
			PacketID:    id, // far from mochi's own ids, which share its table
			Filters:     packets.Subscriptions{{Filter: filter, Qos: 1}},
		})
		r.mustRead(packets.Suback)
	}
	ack := func(id uint16) {
		r.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id})
	}
	subscribe(60001, "devices/+/status")
	first := nextPublish(t, r, "the first retained status")
	other := "dev-a"
	if first.TopicName == statusTopic(other) {
		other = "dev-b"
	}
	// The other status waits for the first one's acknowledgement.
	eventually(t, func() bool {
		buf := make([]byte, 1<<20)
		return strings.Contains(string(buf[:runtime.Stack(buf, true)]), "broker.(*conn).awaitInflightSlot")
	}, "the retained deliveries waiting for an in-flight slot")

	f.b.Revoke(other)
	removal := nextPublish(t, r, other+"'s status removed")
	if removal.TopicName != statusTopic(other) || len(removal.Payload) != 0 {
		t.Fatalf("got %s %q, want %s empty", removal.TopicName, removal.Payload, statusTopic(other))
	}
	ack(removal.PacketID)
	ack(first.PacketID)
	// A later subscription's retained message follows whatever the first
	// one still sends.
	subscribe(60002, first.TopicName)
	if pk := nextPublish(t, r, "the second subscription's status"); pk.TopicName != first.TopicName {
		t.Fatalf("after %s's removal got %s %q: a stale status", other, pk.TopicName, pk.Payload)
	}
}

// A service whose connection ends while its retained statuses are being
// sent, or is taken over by its next one, gets the rest when it resumes
// its session: it has its subscription and need not subscribe again.
// Only those in flight were resent: 128 of 300.
func TestRetainedDeliveryGoesOnAfterResume(t *testing.T) {
	f := newFixture(t, nil)
	const fleet = 300
	for i := range fleet {
		f.retainStatus(fmt.Sprintf("dev-%04d", i), "online")
	}
	for _, takeover := range []bool{false, true} {
		id := fmt.Sprintf("svc-takeover-%v", takeover)
		svcCert := f.service(t, id)
		r := dialRaw(t, f.addr, f.clientTLS(svcCert))
		if ack := connectKept(t, r, id, 600, packets.Properties{}); ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x", ack.ReasonCode)
		}
		subscribeRaw(t, r, "devices/+/status", 1)
		seen := map[string]bool{}
		for range maxInflight / 2 {
			seen[nextPublish(t, r, "a retained status").TopicName] = true
		}
		if !takeover { // else it stays open, its deliveries waiting
			_ = r.conn.Close() // none acknowledged
			cl, ok := f.b.srv.Clients.Get(id)
			if !ok {
				t.Fatalf("no kept session for %s", id)
			}
			eventually(t, cl.Closed, "%s's connection ended", id)
		}

		r = dialRaw(t, f.addr, f.clientTLS(svcCert))
		if ack := connectKept(t, r, id, 600, packets.Properties{}); ack.ReasonCode != 0 || !ack.SessionPresent {
			t.Fatalf("%s: CONNACK %#x, session present %v", id, ack.ReasonCode, ack.SessionPresent)
		}
		for len(seen) < fleet {
			pk := nextPublish(t, r, fmt.Sprintf("%s: status %d of %d after the resume", id, len(seen)+1, fleet))
			r.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
			seen[pk.TopicName] = true
		}
	}
}
