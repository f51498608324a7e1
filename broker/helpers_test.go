package broker

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// secretMarker is put in test payloads; it must never reach a log.
const secretMarker = "PAYLOAD-SECRET-7f3a"

const waitFor = 5 * time.Second

// fixture is a running broker on 127.0.0.1:0 with a real store and a CA
// generated for the test.
type fixture struct {
	ca     *enroll.CA
	db     *store.DB
	dbPath string
	b      *Broker
	addr   string
	logs   *syncBuffer
}

// newFixture starts a broker; mutate may change its config first.
func newFixture(tb testing.TB, mutate func(*Config)) *fixture {
	tb.Helper()
	return newFixtureStore(tb, mutate, nil)
}

// newFixtureStore is newFixture with the broker's view of the store
// wrapped by wrap.
func newFixtureStore(tb testing.TB, mutate func(*Config), wrap func(*store.DB) Store) *fixture {
	tb.Helper()
	dir := tb.TempDir()
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: filepath.Join(dir, "ca")})
	if err != nil {
		tb.Fatalf("create CA: %v", err)
	}
	serverCert, err := ca.IssueServer([]string{"127.0.0.1"}, 24*time.Hour)
	if err != nil {
		tb.Fatalf("issue server cert: %v", err)
	}
	f := &fixture{ca: ca, dbPath: filepath.Join(dir, "fleet.db"), logs: &syncBuffer{}}
	f.db = openStore(tb, f.dbPath)
	cfg := Config{
		Addr:           "127.0.0.1:0",
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &serverCert, nil },
		ClientCAs:      ca.Pool(),
		Node:           "test-node",
		Logger:         zerolog.New(f.logs).Level(zerolog.DebugLevel),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	var st Store = f.db
	if wrap != nil {
		st = wrap(f.db)
	}
	b, err := New(cfg, st)
	if err != nil {
		tb.Fatalf("new broker: %v", err)
	}
	if err := b.Start(); err != nil {
		tb.Fatalf("start broker: %v", err)
	}
	f.b = b
	f.addr = b.Addr().String()
	tb.Cleanup(func() {
		if err := b.Close(); err != nil {
			tb.Errorf("close broker: %v", err)
		}
		if testing.Verbose() {
			tb.Logf("broker log:\n%s", f.logs.String())
		}
		if strings.Contains(f.logs.String(), secretMarker) {
			tb.Errorf("a payload reached the log:\n%s", f.logs.String())
		}
	})
	return f
}

func openStore(tb testing.TB, path string) *store.DB {
	tb.Helper()
	db, err := store.Open(path, store.Options{})
	if err != nil {
		tb.Fatalf("open store: %v", err)
	}
	tb.Cleanup(func() {
		if err := db.Close(); err != nil && !errors.Is(err, store.ErrClosed) {
			tb.Errorf("close store: %v", err)
		}
	})
	return db
}

// device enrolls id through a bootstrap token, as the enrollment API does,
// and returns its client certificate.
func (f *fixture) device(tb testing.TB, id string) tls.Certificate {
	tb.Helper()
	return f.deviceWithLifetime(tb, id, time.Hour)
}

func (f *fixture) deviceWithLifetime(tb testing.TB, id string, lifetime time.Duration) tls.Certificate {
	tb.Helper()
	ctx := context.Background()
	now := time.Now()
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		tb.Fatal(err)
	}
	hash := sha256.Sum256(secret)
	tok := store.Token{ID: hex.EncodeToString(hash[:6]), Hash: hash, MaxUses: 1, ExpiresAt: now.Add(time.Hour)}
	if err := f.db.CreateTokens(ctx, []store.Token{tok}, "test", now); err != nil {
		tb.Fatalf("create token: %v", err)
	}
	cert, rec := f.issue(tb, id, lifetime)
	err := f.db.Enroll(ctx, store.Enrollment{
		TokenHash: hash,
		Device:    store.Device{ID: id},
		Cert:      rec,
		Remote:    "test",
		Now:       now,
	})
	if err != nil {
		tb.Fatalf("enroll %s: %v", id, err)
	}
	return cert
}

// service creates a service identity, as `fleetmq service issue` does.
func (f *fixture) service(tb testing.TB, id string) tls.Certificate {
	tb.Helper()
	cert, rec := f.issue(tb, id, time.Hour)
	err := f.db.CreateIdentity(context.Background(), store.Device{ID: id, Role: store.RoleService}, rec, "test", time.Now())
	if err != nil {
		tb.Fatalf("create service %s: %v", id, err)
	}
	return cert
}

func (f *fixture) issue(tb testing.TB, id string, lifetime time.Duration) (tls.Certificate, store.Cert) {
	tb.Helper()
	return issueFrom(tb, f.ca, id, lifetime)
}

func issueFrom(tb testing.TB, ca *enroll.CA, id string, lifetime time.Duration) (tls.Certificate, store.Cert) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	leaf, err := ca.IssueDevice(&key.PublicKey, id, lifetime)
	if err != nil {
		tb.Fatalf("issue %s: %v", id, err)
	}
	rec := store.Cert{
		Serial:    enroll.SerialHex(leaf.SerialNumber),
		DeviceID:  id,
		NotBefore: leaf.NotBefore,
		NotAfter:  leaf.NotAfter,
		DER:       leaf.Raw,
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}, rec
}

// clientTLS is a device's TLS config for the broker.
func (f *fixture) clientTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		RootCAs:      f.ca.Pool(),
		Certificates: []tls.Certificate{cert},
		ServerName:   "127.0.0.1",
	}
}

func (f *fixture) pahoOpts(id string, cfg *tls.Config) *paho.ClientOptions {
	return paho.NewClientOptions().
		AddBroker("tls://" + f.addr).
		SetClientID(id).
		SetTLSConfig(cfg).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(waitFor).
		SetKeepAlive(30 * time.Second)
}

// connect connects a paho client and disconnects it at cleanup.
func connect(tb testing.TB, opts *paho.ClientOptions) paho.Client {
	tb.Helper()
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(waitFor) {
		tb.Fatal("connect timed out")
	}
	if err := tok.Error(); err != nil {
		tb.Fatalf("connect: %v", err)
	}
	tb.Cleanup(func() { c.Disconnect(0) })
	return c
}

// wait waits for a paho token and returns its error.
func wait(tb testing.TB, tok paho.Token) error {
	tb.Helper()
	if !tok.WaitTimeout(waitFor) {
		tb.Fatal("token timed out")
	}
	return tok.Error()
}

// eventually polls cond until it holds or fails the test after waitFor.
func eventually(tb testing.TB, cond func() bool, format string, args ...any) {
	tb.Helper()
	deadline := time.Now().Add(waitFor)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting: "+format, args...)
		}
		<-tick.C
	}
}

// receive returns the next message from ch or fails the test.
func receive[T any](tb testing.TB, ch <-chan T, what string) T {
	tb.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitFor):
		tb.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// rawClient speaks MQTT over TLS with mochi's packet codec, for what paho
// cannot do (MQTT 5).
type rawClient struct {
	tb   testing.TB
	conn *tls.Conn
	br   *bufio.Reader
	ver  byte
}

func dialRaw(tb testing.TB, addr string, cfg *tls.Config) *rawClient {
	tb.Helper()
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	tb.Cleanup(func() { _ = conn.Close() })
	return &rawClient{tb: tb, conn: conn, br: bufio.NewReader(conn), ver: 5}
}

// dialSmallBuffer is dialRaw with a 4 KiB receive buffer, for a client
// whose socket fills at once when it stops reading.
func dialSmallBuffer(tb testing.TB, addr string, cfg *tls.Config) *rawClient {
	tb.Helper()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		}); err != nil {
			return err
		}
		return serr
	}}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	conn := tls.Client(raw, cfg)
	tb.Cleanup(func() { _ = conn.Close() })
	return &rawClient{tb: tb, conn: conn, br: bufio.NewReader(conn), ver: 5}
}

func (r *rawClient) write(pk packets.Packet) {
	r.tb.Helper()
	pk.ProtocolVersion = r.ver
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	default:
		err = fmt.Errorf("no encoder for packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		r.tb.Fatalf("encode: %v", err)
	}
	if _, err := r.conn.Write(buf.Bytes()); err != nil {
		r.tb.Fatalf("write: %v", err)
	}
}

// read returns the next packet, or the error that ended the connection.
func (r *rawClient) read() (packets.Packet, error) {
	if err := r.conn.SetReadDeadline(time.Now().Add(waitFor)); err != nil {
		return packets.Packet{}, err
	}
	var pk packets.Packet
	pk.ProtocolVersion = r.ver
	hb, err := r.br.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(r.br)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r.br, body); err != nil {
		return pk, err
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

// mustRead returns the next packet of type typ, skipping others.
func (r *rawClient) mustRead(typ byte) packets.Packet {
	r.tb.Helper()
	for {
		pk, err := r.read()
		if err != nil {
			r.tb.Fatalf("read packet type %d: %v", typ, err)
		}
		if pk.FixedHeader.Type == typ {
			return pk
		}
	}
}

// mustBeDisconnected reads until the broker closes the connection, which
// may send a DISCONNECT first; any other packet fails the test.
func (r *rawClient) mustBeDisconnected(when string) {
	r.tb.Helper()
	for {
		pk, err := r.read()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.tb.Fatalf("%s: %v, want the connection closed", when, err)
			}
			return
		}
		if pk.FixedHeader.Type != packets.Disconnect {
			r.tb.Fatalf("%s: got packet type %d, want the connection closed", when, pk.FixedHeader.Type)
		}
	}
}

// connect sends CONNECT with client id and returns the CONNACK.
func (r *rawClient) connect(id string) packets.Packet {
	r.tb.Helper()
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        30,
			ClientIdentifier: id,
		},
	})
	return r.mustRead(packets.Connack)
}

func (r *rawClient) publish(topic string, qos byte, packetID uint16, payload []byte) {
	r.tb.Helper()
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic,
		PacketID:    packetID,
		Payload:     payload,
	})
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
