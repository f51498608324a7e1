package server_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// identity creates identity id with role directly through the CA and the
// store, as enrollment or `fleetmq service issue` would, without the HTTPS
// round trip: fast enough for thousands of devices.
func (s *testServer) identity(tb testing.TB, id string, role store.Role) *device {
	tb.Helper()
	ctx := context.Background()
	key := newKey(tb)
	cert, err := s.CA().IssueDevice(&key.PublicKey, id, 24*time.Hour)
	if err != nil {
		tb.Fatalf("issue %s: %v", id, err)
	}
	now := s.clock.Now()
	rec := store.Cert{Serial: enroll.SerialHex(cert.SerialNumber), DeviceID: id, NotBefore: cert.NotBefore, NotAfter: cert.NotAfter, IssuedAt: now, DER: cert.Raw}
	if role != store.RoleDevice {
		if err := s.Store().CreateIdentity(ctx, store.Device{ID: id, Role: role}, rec, "test", now); err != nil {
			tb.Fatalf("create %s %s: %v", role, id, err)
		}
		return &device{key: key, cert: cert}
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		tb.Fatal(err)
	}
	hash := sha256.Sum256(secret)
	tok := store.Token{ID: enroll.TokenID(hash), Hash: hash, MaxUses: 1, CreatedAt: now, ExpiresAt: now.Add(time.Hour)}
	if err := s.Store().CreateTokens(ctx, []store.Token{tok}, "test", now); err != nil {
		tb.Fatal(err)
	}
	err = s.Store().Enroll(ctx, store.Enrollment{TokenHash: hash, Device: store.Device{ID: id}, Cert: rec, Remote: "test", Now: now})
	if err != nil {
		tb.Fatalf("enroll %s: %v", id, err)
	}
	return &device{key: key, cert: cert}
}

// mqttTLS is a device's TLS configuration for the broker; d may be nil
// for a client without a certificate.
func (s *testServer) mqttTLS(d *device) *tls.Config {
	cfg := &tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1"}
	if d != nil {
		cfg.Certificates = []tls.Certificate{*d.tlsCert()}
	}
	return cfg
}

// rawMQTT is an MQTT 3.1.1 client over TLS that writes whatever bytes it is
// told, for what no real client would send.
type rawMQTT struct {
	tb   testing.TB
	conn *tls.Conn
	br   *bufio.Reader
}

func dialMQTT(tb testing.TB, addr string, cfg *tls.Config) *rawMQTT {
	tb.Helper()
	d := net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(&d, "tcp", addr, cfg)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { _ = conn.Close() })
	return &rawMQTT{tb: tb, conn: conn, br: bufio.NewReader(conn)}
}

// encode returns pk's MQTT 3.1.1 wire form.
func encode(tb testing.TB, pk packets.Packet) []byte {
	tb.Helper()
	pk.ProtocolVersion = 4
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		if pk.Connect.ProtocolName == nil {
			pk.Connect.ProtocolName = []byte("MQTT")
		}
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	default:
		err = fmt.Errorf("no encoder for packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		tb.Fatalf("encode: %v", err)
	}
	return buf.Bytes()
}

func (r *rawMQTT) send(b []byte) {
	r.tb.Helper()
	_ = r.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.conn.Write(b); err != nil {
		r.tb.Fatalf("write: %v", err)
	}
}

// read returns the next packet's type and body, or the error that ended
// the connection; it waits at most d.
func (r *rawMQTT) read(d time.Duration) (byte, []byte, error) {
	_ = r.conn.SetReadDeadline(time.Now().Add(d))
	hb, err := r.br.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, _, err := packets.DecodeLength(r.br)
	if err != nil {
		return 0, nil, err
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r.br, body); err != nil {
		return 0, nil, err
	}
	return hb >> 4, body, nil
}

// connect sends CONNECT for id and returns the CONNACK return code.
func (r *rawMQTT) connect(id string, keepalive uint16) byte {
	r.tb.Helper()
	r.send(encode(r.tb, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{Clean: true, Keepalive: keepalive, ClientIdentifier: id},
	}))
	typ, body, err := r.read(10 * time.Second)
	if err != nil || typ != packets.Connack || len(body) != 2 {
		r.tb.Fatalf("CONNACK: type %d body %x: %v", typ, body, err)
	}
	return body[1]
}

// closedWithin reads until the server closes the connection and fails the
// test if it is still open after d. It returns the packet types the
// server sent before closing.
func (r *rawMQTT) closedWithin(d time.Duration) []byte {
	r.tb.Helper()
	deadline := time.Now().Add(d)
	var got []byte
	for {
		typ, _, err := r.read(time.Until(deadline))
		if err == nil {
			got = append(got, typ)
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			r.tb.Fatalf("connection still open after %s (server sent packet types %v)", d, got)
		}
		return got
	}
}
