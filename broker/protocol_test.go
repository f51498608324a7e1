package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// subscribeRaw subscribes r to filter at qos and checks the grant.
func subscribeRaw(tb testing.TB, r *rawClient, filter string, qos byte) {
	tb.Helper()
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: filter, Qos: qos}},
	})
	if ack := r.mustRead(packets.Suback); len(ack.ReasonCodes) != 1 || ack.ReasonCodes[0] != qos {
		tb.Fatalf("SUBACK %v for %s", ack.ReasonCodes, filter)
	}
}

// nextPublish returns the next PUBLISH r receives.
func nextPublish(tb testing.TB, r *rawClient, what string) packets.Packet {
	tb.Helper()
	for {
		pk, err := r.read()
		if err != nil {
			tb.Fatalf("waiting for %s: %v", what, err)
		}
		if pk.FixedHeader.Type == packets.Publish {
			return pk
		}
	}
}

// watchStatuses connects service svc subscribed to every device's status.
func watchStatuses(tb testing.TB, f *fixture) *rawClient {
	tb.Helper()
	svc := dialRaw(tb, f.addr, f.clientTLS(f.service(tb, "svc")))
	svc.connect("svc")
	subscribeRaw(tb, svc, "devices/+/status", 0)
	return svc
}

// statusRemoved checks that the next message svc gets is the empty one
// removing device id's retained status.
func statusRemoved(tb testing.TB, svc *rawClient, id string) {
	tb.Helper()
	pk := nextPublish(tb, svc, id+"'s status removed")
	if pk.TopicName != "devices/"+id+"/status" || len(pk.Payload) != 0 {
		tb.Fatalf("got %s %q, want devices/%s/status empty", pk.TopicName, pk.Payload, id)
	}
}

// connectWith connects r as id with a clean session and the CONNECT
// properties props, and returns the CONNACK.
func connectWith(tb testing.TB, r *rawClient, id string, props packets.Properties) packets.Packet {
	tb.Helper()
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: id},
		Properties:  props,
	})
	return r.mustRead(packets.Connack)
}

// connectKept connects r as id asking for a session kept expiry seconds,
// and returns the CONNACK.
func connectKept(tb testing.TB, r *rawClient, id string, expiry uint32, props packets.Properties) packets.Packet {
	tb.Helper()
	props.SessionExpiryInterval, props.SessionExpiryIntervalFlag = expiry, true
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: []byte("MQTT"), Keepalive: 30, ClientIdentifier: id},
		Properties:  props,
	})
	return r.mustRead(packets.Connack)
}

// TestDisconnectCannotExtendSession: an MQTT 5 client may set a new
// session expiry in its DISCONNECT; mochi caps the one in CONNECT, not
// that one, so a client could keep its session, subscriptions and queued
// messages for 136 years.
func TestDisconnectCannotExtendSession(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionExpiry = 2 * time.Second })
	r := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	if ack := connectKept(t, r, "svc", 3600, packets.Properties{}); ack.ReasonCode != 0 || ack.Properties.SessionExpiryInterval != 2 {
		t.Fatalf("CONNACK %#x, session expiry %d; want 0, capped to 2", ack.ReasonCode, ack.Properties.SessionExpiryInterval)
	}
	subscribeRaw(t, r, "devices/+/telemetry", 1)
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Disconnect},
		Properties:  packets.Properties{SessionExpiryInterval: 0xFFFFFFFF, SessionExpiryIntervalFlag: true},
	})
	cl, ok := f.b.srv.Clients.Get("svc")
	if !ok {
		t.Fatal("no session")
	}
	// Closed is set after mochi has handled the DISCONNECT.
	eventually(t, cl.Closed, "the connection ended")
	if got := cl.Properties.Props.SessionExpiryInterval; got != 2 {
		t.Fatalf("session expiry after DISCONNECT = %d s, want the cap, 2", got)
	}
	eventually(t, func() bool { _, ok := f.b.srv.Clients.Get("svc"); return !ok }, "the session expired")
}

// TestWillDelayEndsWithSession: mochi waits out a will's whole delay,
// also once the session has ended, where MQTT 5 sends the will: a device
// could schedule a publish for years ahead. The delay is capped to the
// session expiry.
func TestWillDelayEndsWithSession(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionExpiry = time.Second })
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	subscribeRaw(t, svc, "devices/+/status", 0)

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-w")))
	dev.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Keepalive: 30, ClientIdentifier: "dev-w",
			WillFlag: true, WillTopic: "devices/dev-w/status", WillPayload: []byte("offline"),
			WillProperties: packets.Properties{WillDelayInterval: 3600},
		},
		Properties: packets.Properties{SessionExpiryInterval: 3600, SessionExpiryIntervalFlag: true},
	})
	if ack := dev.mustRead(packets.Connack); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	_ = dev.conn.Close() // no DISCONNECT: the will is due
	if pk := nextPublish(t, svc, "the will"); pk.TopicName != "devices/dev-w/status" || string(pk.Payload) != "offline" {
		t.Fatalf("got %s %q, want the will", pk.TopicName, pk.Payload)
	}
}

// TestRevokedDevicePublishesNoWill: a revoked device is thrown off and
// says nothing more — no last will — and the status it left retained
// goes with it: its subscribers get the empty message that removes it.
func TestRevokedDevicePublishesNoWill(t *testing.T) {
	f := newFixture(t, nil)
	svc := watchStatuses(t, f)

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-r")))
	dev.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "dev-r",
			WillFlag: true, WillTopic: "devices/dev-r/status", WillPayload: []byte("will-after-revoke"), WillRetain: true,
		},
	})
	if ack := dev.mustRead(packets.Connack); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	dev.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName:   "devices/dev-r/status", Payload: []byte("online"),
	})
	if pk := nextPublish(t, svc, "the status"); string(pk.Payload) != "online" {
		t.Fatalf("got %q, want online", pk.Payload)
	}

	if _, err := f.db.RevokeDevice(context.Background(), "dev-r", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	f.b.Revoke("dev-r")
	statusRemoved(t, svc, "dev-r")
	dev.mustBeDisconnected("after revocation")
	// A clean session is forgotten after mochi's will step: from here on
	// any will would have been sent.
	eventually(t, func() bool { _, ok := f.b.srv.Clients.Get("dev-r"); return !ok }, "dev-r forgotten")

	marker := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-m")))
	marker.connect("dev-m")
	marker.publish("devices/dev-m/status", 0, 0, []byte("marker"))
	if pk := nextPublish(t, svc, "the marker"); string(pk.Payload) != "marker" {
		t.Fatalf("the service got %s %q before the marker: a revoked device's will", pk.TopicName, pk.Payload)
	}

	late := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc-late")))
	late.connect("svc-late")
	late.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: "devices/dev-r/status"}, {Filter: "devices/dev-m/status"}},
	})
	subscribed := false
	for {
		pk, err := late.read()
		if err != nil {
			t.Fatalf("waiting for the marker: %v", err)
		}
		switch {
		case pk.FixedHeader.Type == packets.Suback && !subscribed:
			subscribed = true
			// Retained messages are queued at the subscription, ahead of it.
			marker.publish("devices/dev-m/status", 0, 0, []byte("marker 2"))
		case pk.FixedHeader.Type != packets.Publish:
		case pk.TopicName == "devices/dev-r/status":
			t.Fatalf("a late subscriber got the revoked device's retained status %q", pk.Payload)
		case string(pk.Payload) == "marker 2":
			return
		}
	}
}

// TestRevokingAnOfflineDeviceClearsItsStatus: a device offline when it is
// revoked left its last will retained ("offline"); the revocation removes
// it as well, and says so to the status's subscribers, which would
// otherwise keep what they last saw of a device that no longer exists.
func TestRevokingAnOfflineDeviceClearsItsStatus(t *testing.T) {
	f := newFixture(t, nil)
	svc := watchStatuses(t, f)
	// A backend away with a kept session gets the removal when it is back.
	awayCert := f.service(t, "svc-away")
	away := dialRaw(t, f.addr, f.clientTLS(awayCert))
	connectKept(t, away, "svc-away", 600, packets.Properties{})
	subscribeRaw(t, away, "devices/+/status", 1)

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-o")))
	dev.connect("dev-o")
	dev.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName:   "devices/dev-o/status", Payload: []byte("offline"),
	})
	if pk := nextPublish(t, svc, "the status"); string(pk.Payload) != "offline" {
		t.Fatalf("got %q, want offline", pk.Payload)
	}
	dev.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	eventually(t, func() bool { _, ok := f.b.srv.Clients.Get("dev-o"); return !ok }, "dev-o gone")
	if pk := nextPublish(t, away, "the status"); string(pk.Payload) != "offline" {
		t.Fatalf("got %q, want offline", pk.Payload)
	}
	away.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: 1})
	_ = away.conn.Close()
	if cl, ok := f.b.srv.Clients.Get("svc-away"); !ok {
		t.Fatal("no kept session for svc-away")
	} else {
		eventually(t, cl.Closed, "svc-away's connection ended")
	}

	if _, err := f.db.RevokeDevice(context.Background(), "dev-o", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	f.b.Revoke("dev-o")
	statusRemoved(t, svc, "dev-o")
	away = dialRaw(t, f.addr, f.clientTLS(awayCert))
	if ack := connectKept(t, away, "svc-away", 600, packets.Properties{}); !ack.SessionPresent {
		t.Fatal("svc-away's session was not kept")
	}
	statusRemoved(t, away, "dev-o")
	if _, ok := f.b.srv.Topics.Retained.Get("devices/dev-o/status"); ok {
		t.Fatal("the revoked device's status is still retained")
	}
}

// TestResentMessagesCarryTheirTopic: mochi resends a kept session's
// unacknowledged messages with the topic alias of the connection they were
// first sent on, which means nothing on the next one; the broker uses no
// outbound aliases, so a v5 subscriber allowing them loses nothing.
func TestResentMessagesCarryTheirTopic(t *testing.T) {
	f := newFixture(t, nil)
	svcCert := f.service(t, "svc")
	connectSvc := func() *rawClient {
		r := dialRaw(t, f.addr, f.clientTLS(svcCert))
		connectKept(t, r, "svc", 600, packets.Properties{TopicAliasMaximum: 10})
		return r
	}
	svc := connectSvc()
	subscribeRaw(t, svc, "devices/+/events/#", 1)

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	dev.connect("dev-a")
	for i := range 3 {
		dev.publish("devices/dev-a/events/boot", 1, uint16(i+1), []byte{byte('0' + i)})
		dev.mustRead(packets.Puback)
		pk := nextPublish(t, svc, "an event")
		if pk.TopicName != "devices/dev-a/events/boot" || pk.Properties.TopicAlias != 0 {
			t.Fatalf("delivery %d: topic %q alias %d, want the name and no alias", i, pk.TopicName, pk.Properties.TopicAlias)
		}
	}
	_ = svc.conn.Close() // none acknowledged: all three are resent

	svc = connectSvc()
	for i := range 3 {
		pk := nextPublish(t, svc, "a resent event")
		if pk.TopicName != "devices/dev-a/events/boot" {
			t.Fatalf("resent %d: topic %q alias %d, want the topic name", i, pk.TopicName, pk.Properties.TopicAlias)
		}
	}
}

// TestFirstPacketIsBoundedBeforeMochiReadsIt: mochi allocates a packet's
// announced length on reading its header; before CONNECT the broker lets
// through only a CONNECT of at most maxConnectPacket bytes, and closes
// the connection at once otherwise, well before the handshake deadline.
func TestFirstPacketIsBoundedBeforeMochiReadsIt(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.HandshakeTimeout = time.Minute })
	cert := f.device(t, "dev-a")
	for name, head := range map[string][]byte{
		"CONNECT announcing 256 KiB":          {0x10, 0xff, 0xff, 0x0f},
		"CONNECT announcing maxConnect+1":     {0x10, 0x81, 0x80, 0x01},
		"PUBLISH first":                       {0x30, 0x05},
		"remaining length of five bytes":      {0x10, 0x80, 0x80, 0x80, 0x80, 0x01},
		"CONNECT header split across records": {0x10, 0xff},
	} {
		t.Run(name, func(t *testing.T) {
			before := f.b.Stats().Refused[ReasonProtocol]
			r := dialRaw(t, f.addr, f.clientTLS(cert))
			if _, err := r.conn.Write(head); err != nil {
				t.Fatal(err)
			}
			if len(head) == 2 && head[0] == 0x10 {
				if _, err := r.conn.Write([]byte{0xff, 0x0f}); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := r.br.ReadByte(); !errors.Is(err, io.EOF) {
				t.Fatalf("read: %v, want the connection closed", err)
			}
			eventually(t, func() bool { return f.b.Stats().Refused[ReasonProtocol] == before+1 }, "refusal counted as protocol")
		})
	}
	// A CONNECT just under the bound, with a will, still goes through.
	r := dialRaw(t, f.addr, f.clientTLS(cert))
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "dev-a",
			WillFlag: true, WillTopic: "devices/dev-a/status", WillPayload: bytes.Repeat([]byte("w"), maxConnectPacket-100)},
	})
	if ack := r.mustRead(packets.Connack); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x for a CONNECT under the bound", ack.ReasonCode)
	}
}

// TestDroppedDeliveriesAreCounted: mochi drops a delivery to a subscriber
// with WriteQueue packets waiting, and a QoS 1 delivery to a kept session
// already holding maxInflight; both are counted for the metrics.
func TestDroppedDeliveriesAreCounted(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.WriteQueue = 8
		c.WriteTimeout = time.Minute // stuck, not kicked, for the test
		c.PublishRate, c.PublishBurst = 100000, 100000
	})
	// A subscriber whose small socket buffer fills at once, and which
	// then reads nothing.
	stuck := dialSmallBuffer(t, f.addr, f.clientTLS(f.service(t, "stuck")))
	stuck.connect("stuck")
	subscribeRaw(t, stuck, "devices/+/events/#", 0)

	// A kept session whose client is away.
	away := dialRaw(t, f.addr, f.clientTLS(f.service(t, "away")))
	connectKept(t, away, "away", 600, packets.Properties{})
	subscribeRaw(t, away, "devices/+/events/#", 1)
	away.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	away.mustBeDisconnected("after DISCONNECT")

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	dev.connect("dev-a")
	payload := bytes.Repeat([]byte("e"), 60_000)
	const n = maxInflight + 50
	for i := range n {
		dev.publish("devices/dev-a/events/big", 1, uint16(i+1), payload)
		if ack := dev.mustRead(packets.Puback); ack.ReasonCode != 0 {
			t.Fatalf("PUBACK %#x", ack.ReasonCode)
		}
	}
	s := f.b.Stats()
	if s.DeliveriesDroppedQueueFull < n-100 {
		t.Errorf("dropped for a full write queue: %d of %d, want most", s.DeliveriesDroppedQueueFull, n)
	}
	// Give or take one: mochi's count of a session's messages and its
	// limit check are not one step.
	if got := s.DeliveriesDroppedInflightFull; got+1 < n-maxInflight || got > n-maxInflight {
		t.Errorf("dropped for a full session: %d, want %d", got, n-maxInflight)
	}
}

// TestAuthenticationMethodIsRefused: the certificate is the only
// authentication; an MQTT 5 client asking for another method (enhanced
// authentication) is refused and its connection closed, as MQTT 5 4.12
// says, instead of being told it succeeded.
func TestAuthenticationMethodIsRefused(t *testing.T) {
	f := newFixture(t, nil)
	r := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	ack := connectWith(t, r, "dev-a", packets.Properties{AuthenticationMethod: "SCRAM-SHA-1", AuthenticationData: []byte("n,,n=dev-a")})
	if ack.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("CONNACK %#x, want not authorized", ack.ReasonCode)
	}
	r.mustBeDisconnected("after the refusal")
	if got := f.b.Stats().Refused[ReasonAuthMethod]; got != 1 {
		t.Fatalf("auth_method refusals = %d, want 1", got)
	}
}

// TestRevokedDelayedWillIsSilenced: a will waiting out its delay when its
// device is revoked is held by mochi out of the broker's reach, and was
// sent to subscribers and retained anyway. The revoked identity's topics
// are now silenced for as long as such a will can wait.
func TestRevokedDelayedWillIsSilenced(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionExpiry = 3 * time.Second })
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	subscribeRaw(t, svc, "devices/+/status", 0)

	// leave connects id with a retained will delayed by delay seconds and
	// drops the connection without DISCONNECT, so the will is scheduled.
	leave := func(id string, delay uint32) {
		dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, id)))
		dev.write(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{
				ProtocolName: []byte("MQTT"), Keepalive: 30, ClientIdentifier: id,
				WillFlag: true, WillTopic: "devices/" + id + "/status", WillPayload: []byte("will of " + id), WillRetain: true,
				WillProperties: packets.Properties{WillDelayInterval: delay},
			},
			Properties: packets.Properties{SessionExpiryInterval: 3, SessionExpiryIntervalFlag: true},
		})
		if ack := dev.mustRead(packets.Connack); ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x", ack.ReasonCode)
		}
		_ = dev.conn.Close()
		cl, ok := f.b.srv.Clients.Get(id)
		if !ok {
			t.Fatalf("no session for %s", id)
		}
		eventually(t, cl.Closed, "%s's connection ended", id)
	}
	leave("dev-gone", 1)
	if _, err := f.db.RevokeDevice(context.Background(), "dev-gone", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	f.b.Revoke("dev-gone")
	statusRemoved(t, svc, "dev-gone")
	// A later will, due at least one of mochi's one-second will passes
	// after the revoked device's.
	leave("dev-control", 2)
	if pk := nextPublish(t, svc, "the control's will"); pk.TopicName != "devices/dev-control/status" {
		t.Fatalf("the service got %s %q: the revoked device's will", pk.TopicName, pk.Payload)
	}
	if got := f.b.srv.Topics.Messages("devices/dev-gone/status"); len(got) != 0 {
		t.Fatalf("the revoked device's will was retained: %q", got[0].Payload)
	}
	// mochi delivers a delayed will before it retains it.
	eventually(t, func() bool { return len(f.b.srv.Topics.Messages("devices/dev-control/status")) == 1 },
		"the control's will retained")
}

// TestLibraryPanicEndsOnlyItsConnection: mochi v2.7.9 reads past the end
// of an MQTT 5 SUBSCRIBE whose last filter has no options byte, and the
// panic, on the connection's goroutine, ended the whole process: one
// device's 8-byte packet took every device offline. It now ends that
// connection and its session only, and sends its last will.
func TestLibraryPanicEndsOnlyItsConnection(t *testing.T) {
	f := newFixture(t, nil)
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	subscribeRaw(t, svc, "devices/+/status", 0)
	devA := f.clientTLS(f.device(t, "dev-a"))
	bad := dialRaw(t, f.addr, devA)
	bad.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "dev-a",
			// At QoS 1, as the agent's.
			WillFlag: true, WillTopic: "devices/dev-a/status", WillPayload: []byte("offline"), WillRetain: true, WillQos: 1,
		},
	})
	bad.mustRead(packets.Connack)
	// SUBSCRIBE: packet id 1, no properties, the filter "a", no options.
	if _, err := bad.conn.Write([]byte{0x82, 0x06, 0, 1, 0, 0, 1, 'a'}); err != nil {
		t.Fatal(err)
	}
	bad.mustBeDisconnected("after the malformed SUBSCRIBE")
	eventually(t, func() bool { _, ok := f.b.srv.Clients.Get("dev-a"); return !ok }, "dev-a's clean session ended")
	if !strings.Contains(f.logs.String(), "SubscribeDecode") {
		t.Errorf("the log does not say where the library failed:\n%s", f.logs.String())
	}
	// Its last will is sent, as when mochi refuses a packet.
	if will := nextPublish(t, svc, "dev-a's last will"); will.TopicName != "devices/dev-a/status" || string(will.Payload) != "offline" {
		t.Fatalf("got %s %q, want dev-a's last will", will.TopicName, will.Payload)
	}
	if _, ok := f.b.srv.Topics.Retained.Get("devices/dev-a/status"); !ok {
		t.Error("the retained will was not retained")
	}

	// The broker goes on: another device's telemetry is stored, and
	// dev-a connects again.
	good := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-b")))
	if ack := good.connect("dev-b"); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	good.publish("devices/dev-b/telemetry", 1, 1, []byte(`{"ok":1}`))
	if ack := good.mustRead(packets.Puback); ack.ReasonCode != 0 {
		t.Fatalf("PUBACK %#x", ack.ReasonCode)
	}
	again := dialRaw(t, f.addr, devA)
	if ack := again.connect("dev-a"); ack.ReasonCode != 0 || ack.SessionPresent {
		t.Fatalf("CONNACK %#x, session present %v; want a new session", ack.ReasonCode, ack.SessionPresent)
	}
}

// TestRetainedStatusOutlivesADay: mochi's default maximum message expiry
// (one day) deleted every retained message a day after it was published,
// whatever its publisher asked: the agent's retained "online", published
// once per connection, vanished from a device connected for more than a
// day, and its "offline" from a device away that long. A message expiry
// the publisher sets still holds.
func TestRetainedStatusOutlivesADay(t *testing.T) {
	f := newFixture(t, nil)
	const kept, canary = "devices/dev-a/status", "devices/dev-b/status"
	// status publishes a retained "online" as device id, acknowledged.
	status := func(id string, expiry uint32) {
		c := dialRaw(t, f.addr, f.clientTLS(f.device(t, id)))
		c.connect(id)
		c.write(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
			TopicName:   "devices/" + id + "/status",
			PacketID:    1,
			Payload:     []byte("online"),
			Properties:  packets.Properties{MessageExpiryInterval: expiry},
		})
		c.mustRead(packets.Puback)
	}
	status("dev-a", 0)
	// Published 25 hours ago, as far as mochi's expiry loop can tell.
	pk, ok := f.b.srv.Topics.Retained.Get(kept)
	if !ok {
		t.Fatal("status not retained")
	}
	pk.Created -= 25 * 3600
	f.b.srv.Topics.Retained.Add(kept, pk)

	// A status that asks to expire after a second: once it is gone,
	// the expiry loop has run since the backdating.
	status("dev-b", 1)
	eventually(t, func() bool { _, ok := f.b.srv.Topics.Retained.Get(canary); return !ok }, "the status set to expire removed")
	if _, ok := f.b.srv.Topics.Retained.Get(kept); !ok {
		t.Fatal("the status retained a day ago was removed")
	}

	// Nor does a subscriber see an expiry the device never set.
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	subscribeRaw(t, svc, "devices/+/status", 1)
	if got := nextPublish(t, svc, "the retained status"); got.TopicName != kept || got.Properties.MessageExpiryInterval != 0 {
		t.Fatalf("got %s with message expiry %d s; want %s without", got.TopicName, got.Properties.MessageExpiryInterval, kept)
	}
}

// TestOwnPacketIDDoesNotDropQueuedCommand: packet ids are per direction,
// and a device's agent numbers its publishes from 1 as mochi numbers the
// commands it sends. mochi keeps both in one in-flight table and, on a
// QoS 1 PUBLISH, deleted whatever entry had its id: a command not yet
// acknowledged was forgotten, and not sent again when the device came back.
func TestOwnPacketIDDoesNotDropQueuedCommand(t *testing.T) {
	f := newFixture(t, nil)
	devCert := f.clientTLS(f.device(t, "dev-a"))
	dev := dialRaw(t, f.addr, devCert)
	connectKept(t, dev, "dev-a", 60, packets.Properties{})
	subscribeRaw(t, dev, "devices/dev-a/commands/#", 1)

	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	var cmds []packets.Packet
	for i, name := range []string{"one", "two", "three"} {
		svc.publish("devices/dev-a/commands/"+name, 1, uint16(i+1), []byte(name))
		svc.mustRead(packets.Puback)
		cmds = append(cmds, nextPublish(t, dev, "command "+name))
	}

	// The device publishes with the commands' ids: telemetry, which the
	// broker acknowledges after its commit, an event, which mochi
	// acknowledges itself, and telemetry again; it acknowledges only the
	// third command.
	for i, topic := range []string{"devices/dev-a/telemetry", "devices/dev-a/events/boot", "devices/dev-a/telemetry"} {
		dev.publish(topic, 1, cmds[i].PacketID, []byte(`{"t":1}`))
		if ack := dev.mustRead(packets.Puback); ack.PacketID != cmds[i].PacketID || ack.ReasonCode != 0 {
			t.Fatalf("PUBACK %d %#x for %s", ack.PacketID, ack.ReasonCode, topic)
		}
	}
	dev.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: cmds[2].PacketID})
	if err := dev.conn.Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() bool {
		cl, ok := f.b.srv.Clients.Get("dev-a")
		return ok && cl.Closed()
	}, "dev-a disconnected")

	back := dialRaw(t, f.addr, devCert)
	if ack := connectKept(t, back, "dev-a", 60, packets.Properties{}); !ack.SessionPresent {
		t.Fatal("session not kept")
	}
	// mochi sends the session's unacknowledged messages before it reads
	// anything: all of them come before the answer to a PINGREQ.
	if _, err := back.conn.Write([]byte{packets.Pingreq << 4, 0}); err != nil {
		t.Fatal(err)
	}
	var resent []string
	for {
		pk, err := back.read()
		if err != nil {
			t.Fatalf("reading after reconnect: %v", err)
		}
		if pk.FixedHeader.Type == packets.Pingresp {
			break
		}
		if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Dup {
			resent = append(resent, string(pk.Payload))
		}
	}
	slices.Sort(resent) // mochi orders them by the second they were sent in
	if strings.Join(resent, ",") != "one,two" {
		t.Fatalf("commands sent again: %q; want the unacknowledged one and two", resent)
	}
}

// TestRevokingAServiceSaysNothingOnStatuses: only devices have a status,
// so revoking a service sends its subscribers no removal.
func TestRevokingAServiceSaysNothingOnStatuses(t *testing.T) {
	f := newFixture(t, nil)
	svc := watchStatuses(t, f)
	f.service(t, "svc-gone")
	if _, err := f.db.RevokeDevice(context.Background(), "svc-gone", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	f.b.Revoke("svc-gone")
	marker := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-m")))
	marker.connect("dev-m")
	marker.publish("devices/dev-m/status", 0, 0, []byte("marker"))
	if pk := nextPublish(t, svc, "the marker"); string(pk.Payload) != "marker" {
		t.Fatalf("the service got %s %q before the marker", pk.TopicName, pk.Payload)
	}
}

// TestCommandToNoOneIsSaid: a command to a device that is not connected and
// keeps no session reaches no one; an MQTT 5 service is told so in its
// PUBACK (0x10, a success code) rather than take it for delivered.
func TestCommandToNoOneIsSaid(t *testing.T) {
	f := newFixture(t, nil)
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	command := func(id uint16) byte {
		svc.publish("devices/dev-c/commands/ping", 1, id, []byte("hello"))
		return svc.mustRead(packets.Puback).ReasonCode
	}
	if got := command(1); got != packets.CodeNoMatchingSubscribers.Code {
		t.Fatalf("PUBACK %#x for a device not connected, want %#x", got, packets.CodeNoMatchingSubscribers.Code)
	}

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-c")))
	dev.connect("dev-c")
	subscribeRaw(t, dev, "devices/dev-c/commands/#", 1)
	if got := command(2); got != 0 {
		t.Fatalf("PUBACK %#x for a connected device, want 0", got)
	}
	if pk := nextPublish(t, dev, "the command"); string(pk.Payload) != "hello" {
		t.Fatalf("the device got %q", pk.Payload)
	}
}

// TestReceiveMaximumHoldsNothingBack: an MQTT 5 subscriber's Receive
// Maximum is not given to mochi, whose flow control held back deliveries
// past it and released them with a double read lock of the client's
// in-flight table: a delivery from another goroutine between the two
// locks deadlocked the table, every publisher to that client, and the
// broker's Close (seen in a soak, 367 goroutines waiting on one table). It
// also released them out of order. Deliveries past the Receive Maximum now
// go out at once, in order.
func TestReceiveMaximumHoldsNothingBack(t *testing.T) {
	f := newFixture(t, nil)
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	if ack := connectWith(t, svc, "svc", packets.Properties{ReceiveMaximum: 2}); ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", ack.ReasonCode)
	}
	subscribeRaw(t, svc, "devices/+/telemetry", 1)

	dev := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	dev.connect("dev-a")
	const n = 6
	for i := range n {
		dev.publish("devices/dev-a/telemetry", 1, uint16(i+1), []byte(strconv.Itoa(i)))
	}
	for range n {
		dev.mustRead(packets.Puback)
	}
	// None acknowledged: mochi sent two and held the rest.
	for i := range n {
		if pk := nextPublish(t, svc, fmt.Sprintf("message %d of %d, unacknowledged", i+1, n)); string(pk.Payload) != strconv.Itoa(i) {
			t.Fatalf("message %d is %q", i, pk.Payload)
		}
	}
}
