package server_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/store"
)

// MQTT wire pieces for packets no client library would build.

func varint(n int) []byte {
	var b []byte
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

func frame(header byte, body []byte) []byte {
	return append(append([]byte{header}, varint(len(body))...), body...)
}

func mqttString(s string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(s))), s...)
}

func publishPacket(qos byte, topic string, id uint16, payload string) []byte {
	body := mqttString(topic)
	if qos > 0 {
		body = binary.BigEndian.AppendUint16(body, id)
	}
	return frame(0x30|qos<<1, append(body, payload...))
}

func subscribePacket(id uint16, filter string, options byte) []byte {
	body := binary.BigEndian.AppendUint16(nil, id)
	if filter != "" {
		body = append(append(body, mqttString(filter)...), options)
	}
	return frame(0x82, body)
}

func connectPacket(tb testing.TB, id string, mod func(*packets.ConnectParams)) []byte {
	tb.Helper()
	c := packets.ConnectParams{Clean: true, Keepalive: 30, ClientIdentifier: id}
	if mod != nil {
		mod(&c)
	}
	return encode(tb, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: c})
}

// TestHostileMQTTClient connects with a valid device certificate and sends
// what the protocol forbids. Each connection must be closed (or, for a
// CONNECT, refused and closed); a device and a service connected alongside
// keep publishing and receiving; and nothing the hostile client sent is
// stored.
func TestHostileMQTTClient(t *testing.T) {
	s := startServer(t)
	evil := s.identity(t, "evil", store.RoleDevice)
	good := s.identity(t, "good", store.RoleDevice)
	backend := s.identity(t, "backend", store.RoleService)
	addr := s.MQTTAddr().String()

	got := make(chan string, 100)
	sub := pahoClient(t, s, backend, "backend", nil)
	defer sub.Disconnect(0)
	if tok := sub.Subscribe("devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + " " + string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	pub := pahoClient(t, s, good, "good", nil)
	defer pub.Disconnect(0)
	sent := 0
	stillServing := func(t *testing.T) {
		t.Helper()
		sent++
		want := fmt.Sprintf("devices/good/telemetry ok-%d", sent)
		if tok := pub.Publish("devices/good/telemetry", 1, false, fmt.Sprintf("ok-%d", sent)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("the good device cannot publish: %v", tok.Error())
		}
		for {
			select {
			case m := <-got:
				if m == want {
					return
				}
				if !strings.HasPrefix(m, "devices/good/") {
					t.Fatalf("the service received %q from the hostile client", m)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("the service did not receive %q", want)
			}
		}
	}

	const telemetry = "devices/evil/telemetry"
	cases := []struct {
		name      string
		connect   bool   // send a valid CONNECT first
		keepalive uint16 // of that CONNECT; default 30
		send      []byte
	}{
		{"PUBLISH before CONNECT", false, 0, publishPacket(1, telemetry, 1, "before-connect")},
		{"SUBSCRIBE before CONNECT", false, 0, subscribePacket(1, "devices/evil/commands/#", 1)},
		{"garbage before CONNECT", false, 0, []byte("GET / HTTP/1.1\r\n\r\n")},
		{"reserved packet type 0", true, 0, []byte{0x00, 0x00}},
		{"AUTH from an MQTT 3.1.1 client", true, 0, []byte{0xf0, 0x00}},
		{"PUBACK with reserved flags", true, 0, []byte{0x42, 0x02, 0x00, 0x01}},
		{"SUBSCRIBE with reserved flags", true, 0, frame(0x80, []byte{0, 1, 0, 1, 'x', 0})},
		{"remaining length over four bytes", true, 0, []byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x7f}},
		{"remaining length beyond the packet size limit", true, 0, append([]byte{0x32}, varint(300<<10)...)},
		{"remaining length beyond what is sent", true, 2, append([]byte{0x30}, append(varint(100), mqttString(telemetry)...)...)},
		{"topic with invalid UTF-8", true, 0, publishPacket(1, telemetry+"/\xff\xfe", 1, "bad-utf8")},
		{"topic with NUL", true, 0, publishPacket(1, telemetry+"/a\x00b", 1, "nul")},
		{"topic with overlong NUL", true, 0, publishPacket(1, telemetry+"/\xc0\x80", 1, "overlong")},
		{"topic with a surrogate half", true, 0, publishPacket(1, telemetry+"/\xed\xa0\x80", 1, "surrogate")},
		{"'#' in a PUBLISH topic", true, 0, publishPacket(1, telemetry+"/#", 1, "hash")},
		{"'+' in a PUBLISH topic", true, 0, publishPacket(1, "devices/+/telemetry", 1, "plus")},
		{"'#' in a QoS 0 PUBLISH topic", true, 0, publishPacket(0, telemetry+"/#", 0, "hash0")},
		{"QoS 3", true, 0, publishPacket(3, telemetry, 1, "qos3")},
		{"QoS 1 without packet id", true, 0, publishPacket(1, telemetry, 0, "no-id")},
		{"empty topic", true, 0, publishPacket(1, "", 1, "empty-topic")},
		{"SUBSCRIBE with zero filters", true, 0, subscribePacket(1, "", 0)},
		{"SUBSCRIBE filter with invalid UTF-8", true, 0, subscribePacket(1, "devices/evil/commands/\xff", 1)},
		{"UNSUBSCRIBE with zero filters", true, 0, frame(0xa2, []byte{0x00, 0x01})},
		{"second CONNECT", true, 0, connectPacket(t, "evil", nil)},
		{"publish to another device's telemetry", true, 0, publishPacket(1, "devices/good/telemetry", 1, "impersonation")},
		{"CONNECT as another device", false, 0, connectPacket(t, "good", nil)},
		{"CONNECT without client id", false, 0, connectPacket(t, "", nil)},
		{"CONNECT as the inline client", false, 0, connectPacket(t, "inline", nil)},
		{"CONNECT with a wildcard will topic", false, 0, connectPacket(t, "evil", func(c *packets.ConnectParams) {
			c.WillFlag, c.WillTopic, c.WillPayload = true, "devices/+/telemetry", []byte("will")
		})},
		{"CONNECT with a will on another device", false, 0, connectPacket(t, "evil", func(c *packets.ConnectParams) {
			c.WillFlag, c.WillTopic, c.WillPayload = true, "devices/good/telemetry", []byte("will")
		})},
		{"CONNECT with an unknown protocol level", false, 0, func() []byte {
			b := connectPacket(t, "evil", nil)
			b[8] = 9 // protocol level, after the fixed header and "MQTT"
			return b
		}()},
		{"CONNECT with reserved flag", false, 0, func() []byte {
			b := connectPacket(t, "evil", nil)
			b[9] |= 0x01 // connect flags: reserved bit
			return b
		}()},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := dialMQTT(t, addr, s.mqttTLS(evil))
			if c.connect {
				ka := c.keepalive
				if ka == 0 {
					ka = 30
				}
				if code := r.connect("evil", ka); code != 0 {
					t.Fatalf("CONNACK %d", code)
				}
			}
			r.send(c.send)
			sentBack := r.closedWithin(10 * time.Second)
			for _, typ := range sentBack {
				if typ == packets.Puback || typ == packets.Suback || typ == packets.Publish {
					t.Errorf("the server answered packet type %d before closing", typ)
				}
				if typ == packets.Connack && c.connect {
					t.Error("a second CONNACK")
				}
			}
			stillServing(t)
		})
	}

	// Filters outside the grant are refused in the SUBACK; the connection
	// may stay, but nothing is delivered through them.
	t.Run("SUBSCRIBE outside the grant", func(t *testing.T) {
		r := dialMQTT(t, addr, s.mqttTLS(evil))
		if code := r.connect("evil", 30); code != 0 {
			t.Fatalf("CONNACK %d", code)
		}
		for i, f := range []string{"#", "devices/+/telemetry/#", "devices/good/commands/#", "$SYS/#", "devices/evil/commands/a#"} {
			r.send(subscribePacket(uint16(i+1), f, 1))
			typ, body, err := r.read(10 * time.Second)
			if err != nil || typ != packets.Suback || len(body) != 3 || body[2] < 0x80 {
				t.Errorf("SUBSCRIBE %q: type %d body %x err %v, want a refusing SUBACK", f, typ, body, err)
			}
		}
		stillServing(t)
		if typ, _, err := r.read(500 * time.Millisecond); err == nil {
			t.Errorf("the refused subscriber received packet type %d", typ)
		}
	})

	if !pub.IsConnectionOpen() || !sub.IsConnectionOpen() {
		t.Fatal("a well-behaved client was disconnected")
	}
	msgs, err := s.Store().Telemetry(context.Background(), "evil", time.Time{}, 0)
	if err != nil || len(msgs) != 0 {
		t.Fatalf("hostile client's telemetry stored: %d messages (%v)", len(msgs), err)
	}
	msgs, err = s.Store().Telemetry(context.Background(), "good", time.Time{}, 0)
	if err != nil || len(msgs) != sent {
		t.Fatalf("good device has %d messages stored, want %d (%v)", len(msgs), sent, err)
	}
}
