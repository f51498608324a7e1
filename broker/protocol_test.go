package broker

import (
	"bytes"
	"errors"
	"io"
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
