package broker

import (
	"slices"
	"strconv"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestResumedSessionGetsMessagesInOrder: a backend that comes back to its
// kept session gets what was queued for it in the order it was published.
// mochi sorted the resend by the second of publication only, with an
// unstable sort, so messages of one second came out shuffled.
func TestResumedSessionGetsMessagesInOrder(t *testing.T) {
	f := newFixture(t, nil)
	svcCert := f.service(t, "svc")
	connectSvc := func() *rawClient {
		r := dialRaw(t, f.addr, f.clientTLS(svcCert))
		if ack := connectKept(t, r, "svc", 600, packets.Properties{}); ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x", ack.ReasonCode)
		}
		return r
	}
	svc := connectSvc()
	subscribeRaw(t, svc, "devices/+/telemetry", 1)
	_ = svc.conn.Close()
	cl, ok := f.b.srv.Clients.Get("svc")
	if !ok {
		t.Fatal("no kept session for svc")
	}
	eventually(t, cl.Closed, "svc's connection ended")

	const n = 64
	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	dev.connect("dev-a")
	for i := range n {
		dev.publish("devices/dev-a/telemetry", 1, uint16(i+1), []byte(strconv.Itoa(i)))
	}
	for range n {
		dev.mustRead(packets.Puback)
	}
	eventually(t, func() bool { return cl.State.Inflight.Len() == n }, "%d messages kept for svc", n)

	svc = connectSvc()
	var got []string
	for range n {
		got = append(got, string(nextPublish(t, svc, "a resent message").Payload))
	}
	for i, p := range got {
		if p != strconv.Itoa(i) {
			t.Fatalf("resent in the order %v", got)
		}
	}
	// The rank written for mochi's sort is gone once the resend is done:
	// a later resume sorts the same entries by their real time again,
	// among newer ones.
	cur, _ := f.b.srv.Clients.Get("svc")
	eventually(t, func() bool {
		for _, pk := range cur.State.Inflight.GetAll(false) {
			if pk.Created < 1_000_000_000 {
				return false
			}
		}
		return true
	}, "every in-flight message back to its real time")
}

// TestResendOrderAcrossTheWrap: mochi numbers a connection's messages up
// to 65535 and on from 1; a session whose in-flight ids span the wrap is
// resent high ids first, and by second before id.
func TestResendOrderAcrossTheWrap(t *testing.T) {
	f := newFixture(t, nil)
	cl := f.b.srv.NewClient(nil, listenerID, "svc", false)
	const sec = 1_800_000_000
	var want []uint16
	for _, e := range []struct {
		id      uint16
		created int64
	}{{65533, sec}, {65535, sec}, {2, sec}, {3, sec + 1}, {65534, sec}, {1, sec}, {40000, sec - 1}} {
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: e.id, Created: e.created})
	}
	want = []uint16{40000, 65533, 65534, 65535, 1, 2, 3}
	order := orderResend(cl)
	var got []uint16
	for _, pk := range cl.State.Inflight.GetAll(false) { // mochi's resend order
		got = append(got, pk.PacketID)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("resent in the order %v, want %v", got, want)
	}
	order.restore(cl)
	if pk, _ := cl.State.Inflight.Get(3); pk.Created != sec+1 {
		t.Fatalf("Created %d after restore, want %d", pk.Created, sec+1)
	}
}
