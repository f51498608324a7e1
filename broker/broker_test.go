package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// handshakeRefused dials with cfg and reports how the server refused the
// TLS handshake. With TLS 1.3 the client's Handshake returns before the
// server has checked the client certificate, so the refusal arrives as an
// alert on the first read; a read that merely times out means it was
// accepted.
func handshakeRefused(tb testing.TB, addr string, cfg *tls.Config) error {
	tb.Helper()
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(waitFor))
	_, err = c.Read(make([]byte, 1))
	if err == nil || isTimeout(err) {
		tb.Fatalf("handshake accepted (read: %v)", err)
	}
	return err
}

func TestHandshakeRequiresFleetCertificate(t *testing.T) {
	f := newFixture(t, nil)
	f.device(t, "dev-a")

	// No client certificate.
	handshakeRefused(t, f.addr, &tls.Config{RootCAs: f.ca.Pool(), ServerName: "127.0.0.1"})
	eventually(t, func() bool { return f.b.Stats().HandshakeFailures[ReasonNoCertificate] == 1 }, "no_certificate counted")

	// A certificate for an enrolled id, from another CA.
	other, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	forged, _ := issueFrom(t, other, "dev-a", time.Hour)
	handshakeRefused(t, f.addr, f.clientTLS(forged))
	eventually(t, func() bool { return f.b.Stats().HandshakeFailures[ReasonUnknownAuthority] == 1 }, "unknown_authority counted")

	// A certificate from the fleet CA that the store never recorded.
	unknown, _ := f.issue(t, "dev-x", time.Hour)
	handshakeRefused(t, f.addr, f.clientTLS(unknown))
	eventually(t, func() bool { return f.b.Stats().HandshakeFailures[ReasonCertUnknown] == 1 }, "cert_unknown counted")

	if got := f.b.Stats().SessionsTotal; got != 0 {
		t.Fatalf("sessions = %d, want 0", got)
	}
}

func TestClientIDMustBeCN(t *testing.T) {
	f := newFixture(t, nil)
	cert := f.device(t, "dev-a")

	// MQTT 3.1.1: refused with return code 5, not authorized.
	c := paho.NewClient(f.pahoOpts("dev-b", f.clientTLS(cert)))
	if err := wait(t, c.Connect()); !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
		t.Fatalf("connect as another id: %v, want %v", err, pahopackets.ErrorRefusedNotAuthorised)
	}

	// MQTT 5: CONNACK 0x87.
	r := dialRaw(t, f.addr, f.clientTLS(cert))
	if ack := r.connect("dev-b"); ack.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("v5 CONNACK reason = %#x, want %#x", ack.ReasonCode, packets.ErrNotAuthorized.Code)
	}

	// MQTT 5 with no client id: assigned the CN.
	r = dialRaw(t, f.addr, f.clientTLS(cert))
	ack := r.connect("")
	if ack.ReasonCode != packets.CodeSuccess.Code || ack.Properties.AssignedClientID != "dev-a" {
		t.Fatalf("v5 empty id: CONNACK reason %#x, assigned %q; want success, dev-a", ack.ReasonCode, ack.Properties.AssignedClientID)
	}
	eventually(t, func() bool { return slices.Equal(f.b.Online(), []string{"dev-a"}) }, "dev-a online")

	// MQTT 3.1.1 with no client id: refused.
	c = paho.NewClient(f.pahoOpts("", f.clientTLS(cert)))
	if err := wait(t, c.Connect()); err == nil {
		c.Disconnect(0)
		t.Fatal("v3 connect without client id accepted")
	}

	// An identity named like mochi's inline client is never admitted.
	inline := f.forgeDevice(t, "inline") // enrollment refuses the id; the broker must too
	c = paho.NewClient(f.pahoOpts("inline", f.clientTLS(inline)))
	if err := wait(t, c.Connect()); !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
		t.Fatalf("connect as inline: %v, want not authorized", err)
	}

	if got := f.b.Stats().Refused[ReasonClientID]; got != 4 {
		t.Fatalf("client_id refusals = %d, want 4", got)
	}
}

func TestOperatorHasNoMQTTAccess(t *testing.T) {
	f := newFixture(t, nil)
	cert, rec := f.issue(t, "op-1", time.Hour)
	if err := f.db.CreateIdentity(context.Background(), store.Device{ID: "op-1", Role: store.RoleOperator}, rec, "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	c := paho.NewClient(f.pahoOpts("op-1", f.clientTLS(cert)))
	if err := wait(t, c.Connect()); !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
		t.Fatalf("operator connect: %v, want not authorized", err)
	}
	if got := f.b.Stats().Refused[ReasonRole]; got != 1 {
		t.Fatalf("role refusals = %d, want 1", got)
	}
}

func TestWillTopicIsChecked(t *testing.T) {
	f := newFixture(t, nil)
	cert := f.device(t, "dev-a")
	opts := f.pahoOpts("dev-a", f.clientTLS(cert)).SetWill("devices/dev-b/commands/reboot", "now", 1, false)
	c := paho.NewClient(opts)
	if err := wait(t, c.Connect()); !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
		t.Fatalf("connect with another device's will topic: %v, want not authorized", err)
	}
	opts = f.pahoOpts("dev-a", f.clientTLS(cert)).SetWill("devices/dev-a/status", "offline", 1, true)
	connect(t, opts)
	if got := f.b.Stats().Refused[ReasonWill]; got != 1 {
		t.Fatalf("will refusals = %d, want 1", got)
	}
}

func TestRevokeClosesSessionAndResumedHandshakes(t *testing.T) {
	f := newFixture(t, nil)
	cert := f.device(t, "dev-a")
	cfg := f.clientTLS(cert)
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(8)

	lost := make(chan error, 1)
	opts := f.pahoOpts("dev-a", cfg).SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	connect(t, opts)
	eventually(t, func() bool { return slices.Contains(f.b.Online(), "dev-a") }, "dev-a online")

	// The session ticket from the paho connection resumes.
	tc, err := tls.Dial("tcp", f.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !tc.ConnectionState().DidResume {
		t.Fatal("second handshake did not resume: the resumed-revocation check below would prove nothing")
	}
	_ = tc.Close()

	if _, err := f.db.RevokeDevice(context.Background(), "dev-a", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	f.b.Revoke("dev-a")
	select {
	case <-lost:
	case <-time.After(time.Second):
		t.Fatal("revoked session still connected after 1s")
	}
	if got := f.b.Stats().Kicked[KickRevoked]; got != 1 {
		t.Fatalf("kicked revoked = %d, want 1", got)
	}
	eventually(t, func() bool { return !slices.Contains(f.b.Online(), "dev-a") }, "dev-a offline")

	// A resumed handshake is refused as well.
	resumedBefore := f.b.Stats().Resumed
	tc, err = tls.Dial("tcp", f.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	resumed := tc.ConnectionState().DidResume
	_ = tc.SetReadDeadline(time.Now().Add(waitFor))
	_, err = tc.Read(make([]byte, 1))
	_ = tc.Close()
	if !resumed {
		t.Fatal("handshake after revocation did not try to resume")
	}
	if err == nil || isTimeout(err) {
		t.Fatalf("resumed handshake of a revoked device accepted (read: %v)", err)
	}
	eventually(t, func() bool {
		s := f.b.Stats()
		return s.Resumed > resumedBefore && s.HandshakeFailures[ReasonRevoked] >= 1
	}, "resumed handshake refused as revoked")

	// And a full reconnect.
	c := paho.NewClient(f.pahoOpts("dev-a", f.clientTLS(cert)))
	if err := wait(t, c.Connect()); err == nil {
		c.Disconnect(0)
		t.Fatal("revoked device reconnected")
	}
}

// pausingStore is the real store, with a way to hold one Device lookup
// after it has read the store.
type pausingStore struct {
	*store.DB
	pauseAt atomic.Int64 // Device call number to hold; 0 for none
	calls   atomic.Int64
	reached chan struct{}
	release chan struct{}
}

func (p *pausingStore) Device(ctx context.Context, id string) (store.Device, error) {
	d, err := p.DB.Device(ctx, id)
	if n := p.calls.Add(1); n == p.pauseAt.Load() {
		p.reached <- struct{}{}
		<-p.release
	}
	return d, err
}

// A revocation made through another node sharing the store reaches this
// node's sessions at the next recheck: it never calls this node's Revoke.
func TestRecheckClosesRevokedElsewhere(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.RecheckInterval = 50 * time.Millisecond })
	lost := map[string]chan error{}
	for _, id := range []string{"dev-a", "dev-b"} {
		ch := make(chan error, 1)
		lost[id] = ch
		connect(t, f.pahoOpts(id, f.clientTLS(f.device(t, id))).SetConnectionLostHandler(func(_ paho.Client, err error) { ch <- err }))
	}
	eventually(t, func() bool { return len(f.b.Online()) == 2 }, "both online")
	svc := watchStatuses(t, f)
	if _, err := f.db.RevokeDevice(context.Background(), "dev-a", "another node", time.Now()); err != nil {
		t.Fatal(err)
	}
	receive(t, lost["dev-a"], "dev-a's disconnection")
	statusRemoved(t, svc, "dev-a")
	eventually(t, func() bool { return slices.Equal(f.b.Online(), []string{"dev-b", "svc"}) }, "only dev-b and svc online")
	if got := f.b.Stats().Kicked[KickRevoked]; got != 1 {
		t.Errorf("kicked revoked = %d, want 1", got)
	}
	// Revoked as an identity, not only a certificate: a delayed will of
	// its would be silenced here too (see silence.go).
	if !f.b.silencedTopic("devices/dev-a/status") || f.b.silencedTopic("devices/dev-b/status") {
		t.Error("the identity revoked elsewhere is not silenced, or another is")
	}
	select {
	case err := <-lost["dev-b"]:
		t.Fatalf("dev-b, not revoked, lost its connection: %v", err)
	default:
	}
}

func TestRevokeRacingConnect(t *testing.T) {
	// A CONNECT whose store check read the identity before it was revoked,
	// and that is admitted only after Revoke ran, must still be refused.
	ps := &pausingStore{reached: make(chan struct{}), release: make(chan struct{})}
	f := newFixtureStore(t, nil, func(db *store.DB) Store { ps.DB = db; return ps })
	cert := f.device(t, "dev-a")
	// Device is read once in the handshake, then again at CONNECT: hold
	// the second.
	ps.pauseAt.Store(2)
	result := make(chan error, 1)
	go func() {
		c := paho.NewClient(f.pahoOpts("dev-a", f.clientTLS(cert)))
		err := wait(t, c.Connect())
		if err == nil {
			c.Disconnect(0)
		}
		result <- err
	}()
	receive(t, ps.reached, "the CONNECT store check")
	if _, err := f.db.RevokeDevice(context.Background(), "dev-a", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	f.b.Revoke("dev-a")
	close(ps.release)
	// Revoke closes the pending connection, so the client sees the
	// connection drop rather than a CONNACK.
	if err := receive(t, result, "the CONNECT result"); err == nil {
		t.Fatal("connect racing a revocation succeeded")
	}
	eventually(t, func() bool { return f.b.Stats().Refused[ReasonRevoked] == 1 }, "refusal counted")
	if s := f.b.Stats(); s.SessionsTotal != 0 || len(f.b.Online()) != 0 {
		t.Fatalf("sessions %d, online %v; want none", s.SessionsTotal, f.b.Online())
	}
}

func TestPublishToAnotherDeviceIsDenied(t *testing.T) {
	f := newFixture(t, nil)
	certA := f.device(t, "dev-a")
	f.device(t, "dev-b")
	svcCert := f.service(t, "svc")

	got := make(chan paho.Message, 16)
	svc := connect(t, f.pahoOpts("svc", f.clientTLS(svcCert)))
	if err := wait(t, svc.Subscribe("devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- m })); err != nil {
		t.Fatal(err)
	}

	lost := make(chan error, 1)
	a := connect(t, f.pahoOpts("dev-a", f.clientTLS(certA)).SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err }))
	// QoS 0 forged publish, then a marker on the same connection: mochi
	// handles a connection's packets in order, so the marker arriving
	// first proves the forged one was never delivered.
	if err := wait(t, a.Publish("devices/dev-b/telemetry", 0, false, "forged "+secretMarker)); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, a.Publish("devices/dev-a/telemetry", 0, false, "marker")); err != nil {
		t.Fatal(err)
	}
	if m := receive(t, got, "marker"); m.Topic() != "devices/dev-a/telemetry" || string(m.Payload()) != "marker" {
		t.Fatalf("service received %s %q before the marker", m.Topic(), m.Payload())
	}

	// QoS 1 forged publish: a 3.1.1 client is disconnected.
	a.Publish("devices/dev-b/telemetry", 1, false, "forged "+secretMarker)
	receive(t, lost, "disconnect after a denied QoS 1 publish")

	// MQTT 5: PUBACK "not authorized".
	r := dialRaw(t, f.addr, f.clientTLS(certA))
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("v5 connect: %#x", ack.ReasonCode)
	}
	r.publish("devices/dev-b/telemetry", 1, 7, []byte("forged "+secretMarker))
	if ack := r.mustRead(packets.Puback); ack.PacketID != 7 || ack.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("v5 denied publish: PUBACK id %d reason %#x, want 7 %#x", ack.PacketID, ack.ReasonCode, packets.ErrNotAuthorized.Code)
	}

	msgs, err := f.db.Telemetry(context.Background(), "dev-b", time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 0 {
		t.Fatalf("stored %d forged messages for dev-b", len(msgs))
	}
	select {
	case m := <-got:
		t.Fatalf("service received %s %q", m.Topic(), m.Payload())
	default:
	}
	if d := f.b.Stats().ACLDenied; d < 3 {
		t.Fatalf("ACL denials = %d, want at least 3", d)
	}
}

func TestSubscriptionsOutsideGrantAreRefused(t *testing.T) {
	f := newFixture(t, nil)
	dev := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	svc := connect(t, f.pahoOpts("svc", f.clientTLS(f.service(t, "svc"))))
	for _, tc := range []struct {
		c    paho.Client
		subs map[string]byte // filter -> expected SUBACK code
	}{
		{dev, map[string]byte{
			"#":                        0x80,
			"devices/+/telemetry":      0x80,
			"$share/g/#":               0x80,
			"$SYS/#":                   0x80,
			"devices/dev-b/commands/#": 0x80,
			"devices/dev-a/#":          0x80,
			"devices/dev-a/commands/#": 1,
			"devices/dev-a/config":     1,
		}},
		{svc, map[string]byte{
			"#":                     0x80,
			"devices/+/commands/#":  0x80,
			"devices/#":             0x80,
			"devices/+/telemetry/#": 1,
			"devices/+/status":      1,
			"devices/+/events/#":    1,
		}},
	} {
		filters := make(map[string]byte)
		for k := range tc.subs {
			filters[k] = 1
		}
		tok := tc.c.SubscribeMultiple(filters, func(paho.Client, paho.Message) {})
		if err := wait(t, tok); err != nil {
			t.Fatal(err)
		}
		res := tok.(*paho.SubscribeToken).Result()
		for filter, want := range tc.subs {
			if res[filter] != want {
				t.Errorf("SUBACK for %q = %#x, want %#x", filter, res[filter], want)
			}
		}
	}
}

func TestServiceReceivesAllTelemetryAndCommandsDevices(t *testing.T) {
	f := newFixture(t, nil)
	svc := connect(t, f.pahoOpts("svc", f.clientTLS(f.service(t, "svc"))))
	got := make(chan paho.Message, 16)
	if err := wait(t, svc.Subscribe("devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- m })); err != nil {
		t.Fatal(err)
	}
	ids := []string{"dev-0", "dev-1", "dev-2"}
	cmds := make(chan paho.Message, 4)
	var devs []paho.Client
	for _, id := range ids {
		d := connect(t, f.pahoOpts(id, f.clientTLS(f.device(t, id))))
		if err := wait(t, d.Subscribe("devices/"+id+"/commands/#", 1, func(_ paho.Client, m paho.Message) { cmds <- m })); err != nil {
			t.Fatal(err)
		}
		devs = append(devs, d)
	}
	for i, d := range devs {
		if err := wait(t, d.Publish("devices/"+ids[i]+"/telemetry/temp", 1, false, ids[i])); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for range ids {
		m := receive(t, got, "telemetry")
		if m.Topic() != "devices/"+string(m.Payload())+"/telemetry/temp" {
			t.Fatalf("service got %q on %s", m.Payload(), m.Topic())
		}
		seen[string(m.Payload())] = true
	}
	if len(seen) != len(ids) {
		t.Fatalf("service saw %v, want all of %v", seen, ids)
	}

	if err := wait(t, svc.Publish("devices/dev-1/commands/reboot", 1, false, "now")); err != nil {
		t.Fatal(err)
	}
	if m := receive(t, cmds, "command"); m.Topic() != "devices/dev-1/commands/reboot" {
		t.Fatalf("command delivered on %s", m.Topic())
	}
	select {
	case m := <-cmds:
		t.Fatalf("command also delivered on %s", m.Topic())
	default:
	}
	// Deliveries are counted after the write, maybe after the reader saw them.
	eventually(t, func() bool {
		s := f.b.Stats()
		return s.MessagesIn == [3]uint64{0, 4, 0} && s.MessagesOut[1] == 4
	}, "4 QoS 1 messages in and out")
}

func TestQoS1TelemetryIsDurableBeforePuback(t *testing.T) {
	f := newFixture(t, nil)
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	ctx := context.Background()
	const n = 20
	for i := range n {
		payload := fmt.Sprintf(`{"n":%d,"s":%q}`, i, secretMarker)
		if err := wait(t, d.Publish("devices/dev-a/telemetry/temp", 1, false, payload)); err != nil {
			t.Fatal(err)
		}
		// The PUBACK came: the message is in the store already.
		msgs, err := f.db.Telemetry(ctx, "dev-a", time.Time{}, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) != i+1 || string(msgs[i].Payload) != payload {
			t.Fatalf("after PUBACK %d the store holds %d messages", i, len(msgs))
		}
	}
	d.Disconnect(100)
	if err := f.b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.db.Close(); err != nil {
		t.Fatal(err)
	}

	db := openStore(t, f.dbPath)
	msgs, err := db.Telemetry(ctx, "dev-a", time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != n {
		t.Fatalf("after reopening: %d messages, want %d", len(msgs), n)
	}
	for i, m := range msgs {
		want := fmt.Sprintf(`{"n":%d,"s":%q}`, i, secretMarker)
		if m.DeviceID != "dev-a" || m.Topic != "devices/dev-a/telemetry/temp" || m.QoS != 1 || string(m.Payload) != want || m.Received.IsZero() {
			t.Fatalf("message %d = %+v %q", i, m, m.Payload)
		}
	}
	if err := db.Check(); err != nil {
		t.Fatal(err)
	}
}

// gatedStore is the real store whose telemetry commits wait for a gate.
type gatedStore struct {
	*store.DB
	entered chan struct{}
	gate    chan struct{}
}

func (g *gatedStore) AppendTelemetry(ctx context.Context, msgs []store.Message) error {
	g.entered <- struct{}{}
	<-g.gate
	return g.DB.AppendTelemetry(ctx, msgs)
}

func TestQoS1AcknowledgedAfterCommitInPublishOrder(t *testing.T) {
	gs := &gatedStore{entered: make(chan struct{}, 16), gate: make(chan struct{})}
	f := newFixtureStore(t, func(c *Config) { c.MaxTelemetryPayload = 32 }, func(db *store.DB) Store { gs.DB = db; return gs })
	got := make(chan paho.Message, 16)
	svc := connect(t, f.pahoOpts("svc", f.clientTLS(f.service(t, "svc"))))
	for _, filter := range []string{"devices/+/telemetry/#", "devices/+/events/#"} {
		if err := wait(t, svc.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) { got <- m })); err != nil {
			t.Fatal(err)
		}
	}
	r := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	r.publish("devices/dev-a/telemetry", 1, 1, []byte("one"))
	receive(t, gs.entered, "the first commit")
	r.publish("devices/dev-a/events/boot", 1, 2, []byte("two"))
	r.publish("devices/dev-a/telemetry", 1, 3, []byte("three, longer than the 32 byte cap"))
	r.publish("devices/dev-a/telemetry", 1, 4, []byte("four"))

	// While the commit is held nothing is acknowledged or delivered, not
	// even the publishes that need no commit: they are behind it.
	_ = r.conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := r.br.Peek(1); !isTimeout(err) {
		t.Fatalf("got a packet before the commit (%v)", err)
	}
	select {
	case m := <-got:
		t.Fatalf("delivered %s before the commit", m.Topic())
	default:
	}

	close(gs.gate)
	for _, want := range []struct {
		id   uint16
		code byte
	}{{1, 0}, {2, 0}, {3, packets.ErrPacketTooLarge.Code}, {4, 0}} {
		ack := r.mustRead(packets.Puback)
		if ack.PacketID != want.id || ack.ReasonCode != want.code {
			t.Fatalf("PUBACK id %d reason %#x, want id %d reason %#x", ack.PacketID, ack.ReasonCode, want.id, want.code)
		}
	}
	for _, want := range []string{"one", "two", "four"} {
		if m := receive(t, got, "delivery"); string(m.Payload()) != want {
			t.Fatalf("delivered %q, want %q", m.Payload(), want)
		}
	}
	msgs, err := f.db.Telemetry(context.Background(), "dev-a", time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || string(msgs[0].Payload) != "one" || string(msgs[1].Payload) != "four" {
		t.Fatalf("stored %d messages, want one and four", len(msgs))
	}
}

func TestTelemetryNotAcknowledgedWhenStoreFails(t *testing.T) {
	f := newFixture(t, nil)
	cert := f.device(t, "dev-a")
	v5 := dialRaw(t, f.addr, f.clientTLS(cert))
	if ack := v5.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	v3 := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-b")))
	v3.ver = 4
	if ack := v3.connect("dev-b"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	if err := f.db.Close(); err != nil {
		t.Fatal(err)
	}

	// 3.1.1 cannot refuse in a PUBACK: the publisher is disconnected, so
	// that it resends after reconnecting rather than wait for ever with
	// an in-flight slot taken.
	v3.publish("devices/dev-b/telemetry", 1, 8, []byte("lost"))
	v3.mustBeDisconnected("after a failed commit")
	if got := f.b.Stats().TelemetryFailed; got != 1 {
		t.Fatalf("failed = %d, want 1", got)
	}
	v5.publish("devices/dev-a/telemetry", 1, 9, []byte("lost"))
	if ack := v5.mustRead(packets.Puback); ack.PacketID != 9 || ack.ReasonCode != packets.ErrUnspecifiedError.Code {
		t.Fatalf("PUBACK id %d reason %#x, want 9 %#x", ack.PacketID, ack.ReasonCode, packets.ErrUnspecifiedError.Code)
	}
	if got := f.b.Stats().TelemetryFailed; got != 2 {
		t.Fatalf("failed = %d, want 2", got)
	}
	if got := f.b.Stats().TelemetryStored; got != 0 {
		t.Fatalf("stored = %d, want 0", got)
	}
}

func TestQoS0TelemetryAndFollow(t *testing.T) {
	f := newFixture(t, nil)
	follow, cancel := f.b.Follow("dev-a")
	other, cancelOther := f.b.Follow("dev-b")
	defer cancelOther()
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	if err := wait(t, d.Publish("devices/dev-a/telemetry", 0, false, "q0")); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, d.Publish("devices/dev-a/events/boot", 1, false, "not telemetry")); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, d.Publish("devices/dev-a/telemetry/x", 1, false, "q1")); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"q0", "q1"} {
		m := receive(t, follow, "followed message")
		if string(m.Payload) != want || m.DeviceID != "dev-a" {
			t.Fatalf("followed %q of %s, want %q", m.Payload, m.DeviceID, want)
		}
	}
	select {
	case m := <-other:
		t.Fatalf("dev-b follower got %+v", m)
	default:
	}
	cancel()
	cancel()
	if _, ok := <-follow; ok {
		t.Fatal("follow channel open after cancel")
	}
	msgs, err := f.db.Telemetry(context.Background(), "dev-a", time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || msgs[0].QoS != 0 || msgs[1].QoS != 1 {
		t.Fatalf("stored %+v, want the QoS 0 and the QoS 1 telemetry", msgs)
	}
	if err := f.b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-other; ok {
		t.Fatal("follow channel open after Close")
	}
	late, cancelLate := f.b.Follow("dev-a")
	cancelLate()
	if _, ok := <-late; ok {
		t.Fatal("Follow after Close returned an open channel")
	}
}

// TestMQTT311RefusedPublishDisconnects: a 3.1.1 PUBACK cannot refuse, and
// an unanswered QoS 1 publish would hold one of the client's in-flight
// slots for good: the client is disconnected and resends.
func TestMQTT311RefusedPublishDisconnects(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.MaxTelemetryPayload = 16 })
	r := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	r.ver = 4
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	r.publish("devices/dev-a/telemetry", 1, 1, []byte("fits"))
	if ack := r.mustRead(packets.Puback); ack.PacketID != 1 {
		t.Fatalf("PUBACK for %d", ack.PacketID)
	}
	r.publish("devices/dev-a/telemetry", 1, 2, []byte("0123456789abcdefX"))
	r.mustBeDisconnected("after a publish over the size limit")
	if s := f.b.Stats(); s.TelemetryTooLarge != 1 || s.TelemetryStored != 1 {
		t.Fatalf("too large %d, stored %d; want 1, 1", s.TelemetryTooLarge, s.TelemetryStored)
	}
}

// TestMQTT5Acknowledgements: a refused QoS 2 publish gets a PUBREC with
// the reason (mochi would send a PUBACK), and a QoS 1 PUBACK is a plain
// success even when the publish carried properties (mochi copied them,
// and its code 0x01, into the PUBACK).
func TestMQTT5Acknowledgements(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.MaxTelemetryPayload = 16 })
	r := dialRaw(t, f.addr, f.clientTLS(f.device(t, "dev-a")))
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2},
		TopicName:   "devices/dev-a/telemetry",
		PacketID:    7,
		Payload:     []byte("0123456789abcdefX"),
	})
	if rec := r.mustRead(packets.Pubrec); rec.PacketID != 7 || rec.ReasonCode != packets.ErrPacketTooLarge.Code {
		t.Fatalf("PUBREC id %d reason %#x, want 7 %#x", rec.PacketID, rec.ReasonCode, packets.ErrPacketTooLarge.Code)
	}
	pub := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   "devices/dev-a/events/boot",
		PacketID:    8,
		Payload:     []byte("up"),
	}
	pub.Properties.User = []packets.UserProperty{{Key: "k", Val: "v"}}
	r.write(pub)
	if ack := r.mustRead(packets.Puback); ack.PacketID != 8 || ack.ReasonCode != 0 || len(ack.Properties.User) != 0 {
		t.Fatalf("PUBACK id %d reason %#x properties %v, want 8, 0, none", ack.PacketID, ack.ReasonCode, ack.Properties.User)
	}
}

func TestTelemetryPayloadCapAndRateLimit(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.MaxTelemetryPayload = 16
		c.PublishRate = 0.001 // no refill during the test
		c.PublishBurst = 3
	})
	cert := f.device(t, "dev-a")
	r := dialRaw(t, f.addr, f.clientTLS(cert))
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	for _, tc := range []struct {
		payload string
		want    byte
	}{
		{"0123456789abcdef", packets.CodeSuccess.Code},
		{"0123456789abcdefX", packets.ErrPacketTooLarge.Code},
		{"ok", packets.CodeSuccess.Code},
		{"limited", packets.ErrMessageRateTooHigh.Code},
	} {
		r.publish("devices/dev-a/telemetry", 1, 1, []byte(tc.payload))
		if ack := r.mustRead(packets.Puback); ack.ReasonCode != tc.want {
			t.Fatalf("publish %q: PUBACK %#x, want %#x", tc.payload, ack.ReasonCode, tc.want)
		}
	}
	s := f.b.Stats()
	if s.RateLimited != 1 || s.TelemetryTooLarge != 1 || s.TelemetryStored != 2 {
		t.Fatalf("rate limited %d, too large %d, stored %d; want 1, 1, 2", s.RateLimited, s.TelemetryTooLarge, s.TelemetryStored)
	}

	// The bucket is per identity: a 3.1.1 connection of the same device,
	// taking the session over, finds it empty and its QoS 0 publish is
	// dropped.
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)))
	if err := wait(t, d.Publish("devices/dev-a/telemetry", 0, false, "dropped")); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() bool { return f.b.Stats().RateLimited == 2 }, "QoS 0 publish rate limited")
	msgs, err := f.db.Telemetry(context.Background(), "dev-a", time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || string(msgs[0].Payload) != "0123456789abcdef" || string(msgs[1].Payload) != "ok" {
		t.Fatalf("stored %d messages, want the 2 accepted", len(msgs))
	}

	// Nor does reconnecting refill it: with no connection left, the
	// identity's bucket is kept until it has refilled by itself.
	d.Disconnect(0)
	r.conn.Close()
	eventually(t, func() bool { return len(f.b.Online()) == 0 && f.b.Stats().OpenConnections == 0 }, "all connections closed")
	r = dialRaw(t, f.addr, f.clientTLS(cert))
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("reconnect: %#x", ack.ReasonCode)
	}
	r.publish("devices/dev-a/telemetry", 1, 2, []byte("again"))
	if ack := r.mustRead(packets.Puback); ack.ReasonCode != packets.ErrMessageRateTooHigh.Code {
		t.Fatalf("publish after reconnecting: PUBACK %#x, want %#x (rate limited)", ack.ReasonCode, packets.ErrMessageRateTooHigh.Code)
	}
}

// TestRateLimitHoldsMQTT311Publishes: MQTT 3.1.1 cannot refuse a publish,
// so one over the rate waits for the bucket instead of being dropped
// without a PUBACK (which a client waits out for its whole timeout): every
// QoS 1 message of a burst over the limit is acknowledged and stored, at
// the rate.
func TestRateLimitHoldsMQTT311Publishes(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.PublishRate = 50
		c.PublishBurst = 2
	})
	cert := f.device(t, "dev-a")
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)))
	const n = 20
	toks := make([]paho.Token, n)
	for i := range toks {
		toks[i] = d.Publish("devices/dev-a/telemetry", 1, false, fmt.Sprintf(`{"n":%d}`, i))
	}
	for i, tok := range toks {
		if err := wait(t, tok); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	s := f.b.Stats()
	if s.RateLimited != 0 || s.Delayed == 0 || s.TelemetryStored != n {
		t.Fatalf("rate limited %d, delayed %d, stored %d; want 0, > 0, %d", s.RateLimited, s.Delayed, s.TelemetryStored, n)
	}
}

func TestHandshakeAndConnectDeadline(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.HandshakeTimeout = 300 * time.Millisecond })
	cert := f.device(t, "dev-a")

	// A socket that never starts the handshake.
	raw, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	start := time.Now()
	_ = raw.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := raw.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("silent socket read = %v, want EOF (closed by the server)", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("closed after %s, before the deadline", d)
	}

	// A socket that handshakes and never sends CONNECT.
	tc, err := tls.Dial("tcp", f.addr, f.clientTLS(cert))
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	_ = tc.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := tc.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("socket without CONNECT read = %v, want closed by the server", err)
	}

	eventually(t, func() bool {
		s := f.b.Stats()
		return s.HandshakeFailures[ReasonTimeout] == 1 && s.Refused[ReasonConnectTimeout] == 1 && s.OpenConnections == 0
	}, "deadline refusals counted and sockets closed")

	// The deadline does not cut a connected session: keepalive takes over.
	// A silent socket accepted after the session was established is
	// closed at its deadline, so by then the session's has passed too.
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)))
	probe, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	_ = probe.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := probe.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("probe socket read = %v, want EOF", err)
	}
	if err := wait(t, d.Publish("devices/dev-a/telemetry", 1, false, "still here")); err != nil || !d.IsConnectionOpen() {
		t.Fatalf("session closed by the handshake deadline: %v", err)
	}
}

// dialIdle opens n sockets to addr that send nothing, closed at cleanup.
func dialIdle(tb testing.TB, addr string, n int) []net.Conn {
	tb.Helper()
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = c.Close() })
		conns = append(conns, c)
	}
	return conns
}

// TestIdleSocketsDoNotStarveDevices: sockets that never handshake hold
// no lock or worker a device needs. They come from two other addresses
// than the device's, each under the default MaxPendingPerAddress (256),
// so that all of them stay open.
func TestIdleSocketsDoNotStarveDevices(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.HandshakeTimeout = time.Minute })
	const idle = 500
	dialIdleFrom(t, "127.0.0.2", f.addr, idle/2)
	dialIdleFrom(t, "127.0.0.3", f.addr, idle/2)
	eventually(t, func() bool { return f.b.Stats().OpenConnections == idle }, "%d idle sockets open", idle)
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	if err := wait(t, d.Publish("devices/dev-a/telemetry", 1, false, "hello")); err != nil {
		t.Fatal(err)
	}
	if n := f.b.Stats().OpenConnections; n != idle+1 {
		t.Fatalf("open connections = %d, want %d", n, idle+1)
	}
}

func TestMaxConnections(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.MaxConnections = 2
		c.HandshakeTimeout = time.Minute
	})
	cert := f.device(t, "dev-a")
	idle := dialIdle(t, f.addr, 2)
	eventually(t, func() bool { return f.b.Stats().OpenConnections == 2 }, "2 sockets open")

	c := paho.NewClient(f.pahoOpts("dev-a", f.clientTLS(cert)))
	if err := wait(t, c.Connect()); err == nil {
		c.Disconnect(0)
		t.Fatal("connected beyond MaxConnections")
	}
	if got := f.b.Stats().Refused[ReasonMaxConnections]; got != 1 {
		t.Fatalf("max_connections refusals = %d, want 1", got)
	}
	if c, err := net.Dial("tcp", f.addr); err == nil { // refused too, not logged again
		_, _ = c.Read(make([]byte, 1))
		_ = c.Close()
	}
	eventually(t, func() bool { return f.b.Stats().Refused[ReasonMaxConnections] == 2 }, "a second refusal")
	if n := strings.Count(f.logs.String(), "the connection limit is reached"); n != 1 {
		t.Errorf("the limit was logged %d times for 2 refusals, want once", n)
	}

	_ = idle[0].Close()
	eventually(t, func() bool { return f.b.Stats().OpenConnections == 1 }, "slot freed")
	connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)))
}

// TestOpenFileLimitCapsConnections: with fewer descriptors than
// MaxConnections needs, the broker holds only what leaves a reserve for the
// rest of the process, refuses the others as over the limit, and says so at
// start.
func TestOpenFileLimitCapsConnections(t *testing.T) {
	const nofile = 40 // a reserve of 32 leaves 8
	f := newFixture(t, func(c *Config) {
		c.OpenFileLimit = nofile
		c.HandshakeTimeout = time.Minute
	})
	capped := fdConnectionCap(nofile)
	if !strings.Contains(f.logs.String(), fmt.Sprintf("accepting at most %d MQTT connections", capped)) {
		t.Errorf("no warning at start about the open file limit:\n%s", f.logs.String())
	}
	dialIdle(t, f.addr, capped)
	eventually(t, func() bool { return f.b.Stats().OpenConnections == capped }, "%d sockets open", capped)
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("socket beyond the cap: read = %v, want it closed at once", err)
	}
	eventually(t, func() bool { return f.b.Stats().Refused[ReasonMaxConnections] == 1 }, "the refusal counted")
}

// TestAcceptFailuresLoggedOncePerMinute: while the process is out of
// descriptors every accept fails; the broker logged each retry (QA: 900
// lines in 15 minutes, bursts 5 ms apart as descriptors came and went).
// It now logs the first with advice, then at most once a minute with the
// count held back, and still counts every failure.
func TestAcceptFailuresLoggedOncePerMinute(t *testing.T) {
	f := newFixture(t, nil)
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	for range 100 {
		f.b.ln.onError(emfile, minAcceptBackoff)
	}
	logs := f.logs.String()
	if n := strings.Count(logs, "broker: accept failed"); n != 1 {
		t.Errorf("100 accept failures logged %d times, want once:\n%s", n, logs)
	}
	if !strings.Contains(logs, "out of file descriptors: raise the limit") {
		t.Errorf("the accept failure gives no advice:\n%s", logs)
	}
	if got := f.b.Stats().AcceptErrors; got != 100 {
		t.Errorf("accept errors counted = %d, want 100", got)
	}
}

func TestLogEvery(t *testing.T) {
	l := logEvery{period: time.Minute}
	t0 := time.Unix(1e9, 0)
	for _, step := range []struct {
		at   time.Duration
		ok   bool
		held int
	}{
		{0, true, 0},
		{time.Second, false, 0},
		{59 * time.Second, false, 0},
		{time.Minute, true, 2},
		{time.Minute + time.Second, false, 0},
		{3 * time.Minute, true, 1},
	} {
		ok, held := l.allow(t0.Add(step.at))
		if ok != step.ok || held != step.held {
			t.Errorf("at %s: allow = %v, %d; want %v, %d", step.at, ok, held, step.ok, step.held)
		}
	}
}

func TestFDConnectionCap(t *testing.T) {
	for _, tc := range []struct {
		nofile uint64
		want   int
	}{
		{1 << 20, 1<<20 - 1<<18},
		{65536, 49152},
		{1024, 768},
		{256, 192},
		{64, 32},
		{33, 1},
		{32, 1},
		{1, 1},
	} {
		if got := fdConnectionCap(tc.nofile); got != tc.want {
			t.Errorf("fdConnectionCap(%d) = %d, want %d", tc.nofile, got, tc.want)
		}
	}
}

func TestCertificateExpiryClosesSession(t *testing.T) {
	var offset atomic.Int64
	f := newFixture(t, func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	})
	cert := f.device(t, "dev-a")
	// Move the broker's clock to just before the certificate's expiry.
	offset.Store(int64(time.Until(cert.Leaf.NotAfter) - 300*time.Millisecond))
	lost := make(chan error, 1)
	connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)).SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err }))
	receive(t, lost, "disconnect at certificate expiry")
	if got := f.b.Stats().Kicked[KickCertExpired]; got != 1 {
		t.Fatalf("cert_expired kicks = %d, want 1", got)
	}
}

func TestPresence(t *testing.T) {
	f := newFixture(t, nil)
	cert := f.device(t, "dev-a")
	ctx := context.Background()
	presence := func() store.Presence {
		ps, err := f.db.Presences(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return ps["dev-a"]
	}

	lost := make(chan error, 1)
	first := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)).SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err }))
	eventually(t, func() bool { p := presence(); return p.Online && p.Node == "test-node" }, "dev-a online in the store")

	// A second connection takes the session over; the identity stays online.
	second := connect(t, f.pahoOpts("dev-a", f.clientTLS(cert)))
	receive(t, lost, "first connection taken over")
	_ = first
	if got := f.b.Online(); !slices.Equal(got, []string{"dev-a"}) {
		t.Fatalf("online = %v after takeover", got)
	}
	if p := presence(); !p.Online {
		t.Fatalf("presence %+v after takeover, want online", p)
	}

	second.Disconnect(100)
	eventually(t, func() bool { p := presence(); return !p.Online && !p.LastSeen.IsZero() }, "dev-a offline in the store")
	if got := f.b.Online(); len(got) != 0 {
		t.Fatalf("online = %v after disconnect", got)
	}
}

func TestKeepaliveIsEnforced(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.MaxKeepalive = time.Second })
	cert := f.device(t, "dev-a")

	// MQTT 5 asking for no keepalive is told the server's.
	r := dialRaw(t, f.addr, f.clientTLS(cert))
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "dev-a"},
	})
	ack := r.mustRead(packets.Connack)
	if ack.ReasonCode != 0 || !ack.Properties.ServerKeepAliveFlag || ack.Properties.ServerKeepAlive != 1 {
		t.Fatalf("CONNACK reason %#x, server keepalive %v %d; want success, 1s", ack.ReasonCode, ack.Properties.ServerKeepAliveFlag, ack.Properties.ServerKeepAlive)
	}
	// A silent client is closed after 1.5 keepalives.
	start := time.Now()
	if _, err := r.read(); err == nil || isTimeout(err) {
		t.Fatalf("silent client: %v, want closed by the server", err)
	}
	// mochi sets the deadline to 1.5 keepalives, in whole seconds, just
	// before it sends the CONNACK.
	if d := time.Since(start); d < 500*time.Millisecond || d > 4*time.Second {
		t.Fatalf("silent client closed after %s, want about 1s", d)
	}
}

func TestSubscriptionLimit(t *testing.T) {
	f := newFixture(t, nil)
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	filters := make(map[string]byte)
	for i := range maxSubscriptions + 1 {
		filters[fmt.Sprintf("devices/dev-a/commands/%d", i)] = 1
	}
	tok := d.SubscribeMultiple(filters, func(paho.Client, paho.Message) {})
	if err := wait(t, tok); err != nil {
		t.Fatal(err)
	}
	refused := 0
	for _, code := range tok.(*paho.SubscribeToken).Result() {
		if code == 0x80 {
			refused++
		}
	}
	if refused != 1 || f.b.Stats().SubscriptionLimit != 1 {
		t.Fatalf("refused %d filters, counted %d; want 1, 1", refused, f.b.Stats().SubscriptionLimit)
	}
	// Renewing an existing subscription is not a new one.
	if err := wait(t, d.Subscribe("devices/dev-a/commands/0", 1, nil)); err != nil {
		t.Fatal(err)
	}
	if got := f.b.Stats().SubscriptionLimit; got != 1 {
		t.Fatalf("resubscribing counted against the limit (%d)", got)
	}
}

// TestSubscriptionLimitSaysQuota: over MQTT 5 a filter over the limit is
// refused as "quota exceeded", not as an invalid filter, which it is not.
func TestSubscriptionLimitSaysQuota(t *testing.T) {
	f := newFixture(t, nil)
	svc := dialRaw(t, f.addr, f.clientTLS(f.service(t, "svc")))
	svc.connect("svc")
	var filters packets.Subscriptions
	for i := range maxSubscriptions + 1 {
		filters = append(filters, packets.Subscription{Filter: fmt.Sprintf("devices/pi-%d/telemetry", i), Qos: 1})
	}
	svc.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1, Filters: filters})
	codes := svc.mustRead(packets.Suback).ReasonCodes
	if len(codes) != maxSubscriptions+1 || codes[0] != 1 || codes[maxSubscriptions-1] != 1 {
		t.Fatalf("SUBACK %v, want %d granted before the last", codes, maxSubscriptions)
	}
	if last := codes[maxSubscriptions]; last != packets.ErrQuotaExceeded.Code {
		t.Fatalf("SUBACK %#x for the filter over the limit, want %#x (quota exceeded)", last, packets.ErrQuotaExceeded.Code)
	}
}

func TestOnlyStatusIsRetained(t *testing.T) {
	f := newFixture(t, nil)
	d := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	for _, topic := range []string{"devices/dev-a/events/a", "devices/dev-a/telemetry", "devices/dev-a/status"} {
		if err := wait(t, d.Publish(topic, 1, true, topic)); err != nil {
			t.Fatal(err)
		}
	}
	// A later subscriber gets only the status as retained.
	got := make(chan paho.Message, 8)
	svc := connect(t, f.pahoOpts("svc", f.clientTLS(f.service(t, "svc"))))
	tok := svc.SubscribeMultiple(map[string]byte{"devices/+/events/#": 1, "devices/+/telemetry/#": 1, "devices/+/status": 1},
		func(_ paho.Client, m paho.Message) { got <- m })
	if err := wait(t, tok); err != nil {
		t.Fatal(err)
	}
	m := receive(t, got, "retained status")
	if m.Topic() != "devices/dev-a/status" || !m.Retained() {
		t.Fatalf("retained delivery %s (retained %v), want the status", m.Topic(), m.Retained())
	}
	// Marker: anything retained elsewhere would have arrived before it.
	if err := wait(t, d.Publish("devices/dev-a/status", 1, false, "marker")); err != nil {
		t.Fatal(err)
	}
	if m := receive(t, got, "marker"); string(m.Payload()) != "marker" {
		t.Fatalf("got %s %q, want the marker", m.Topic(), m.Payload())
	}
}

func TestProtocolLimits(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.MaxPacketSize = 1024 })
	cert := f.device(t, "dev-a")

	// MQTT 3.1 is refused: return code 1, unacceptable protocol version.
	r := dialRaw(t, f.addr, f.clientTLS(cert))
	r.ver = 3
	r.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: []byte("MQIsdp"), Clean: true, Keepalive: 30, ClientIdentifier: "dev-a"},
	})
	if ack := r.mustRead(packets.Connack); ack.ReasonCode != packets.Err3UnsupportedProtocolVersion.Code {
		t.Fatalf("MQTT 3.1 CONNACK %#x, want %#x", ack.ReasonCode, packets.Err3UnsupportedProtocolVersion.Code)
	}
	eventually(t, func() bool { return f.b.Stats().Refused[ReasonProtocol] == 1 }, "protocol refusal counted")

	// A packet over MaxPacketSize ends the connection.
	r = dialRaw(t, f.addr, f.clientTLS(cert))
	if ack := r.connect("dev-a"); ack.ReasonCode != 0 {
		t.Fatalf("connect: %#x", ack.ReasonCode)
	}
	r.publish("devices/dev-a/telemetry", 1, 1, make([]byte, 2048))
	if pk, err := r.read(); err == nil && pk.FixedHeader.Type != packets.Disconnect {
		t.Fatalf("oversized packet answered with packet type %d", pk.FixedHeader.Type)
	} else if isTimeout(err) {
		t.Fatal("oversized packet: connection still open")
	}
	if got := f.b.Stats().TelemetryStored; got != 0 {
		t.Fatalf("stored %d messages", got)
	}
}

func TestStartAndClose(t *testing.T) {
	f := newFixture(t, nil)
	// A busy port is an error at Start.
	b2, err := New(Config{
		Addr:           f.addr,
		GetCertificate: f.b.cfg.GetCertificate,
		ClientCAs:      f.ca.Pool(),
	}, f.db)
	if err != nil {
		t.Fatal(err)
	}
	if err := b2.Start(); err == nil {
		t.Fatal("Start on a busy port succeeded")
	}
	if err := b2.Close(); err != nil {
		t.Fatal(err)
	}

	connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	if err := f.b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := f.b.Start(); err == nil {
		t.Fatal("Start after Close succeeded")
	}
	if _, err := net.Dial("tcp", f.addr); err == nil {
		t.Fatal("still accepting after Close")
	}
	ps, err := f.db.Presences(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ps["dev-a"].Online {
		t.Fatal("presence still online after Close")
	}
}

func TestConfigValidation(t *testing.T) {
	db := openStore(t, filepath.Join(t.TempDir(), "fleet.db"))
	ok := Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return nil, errors.New("unused") },
		ClientCAs:      x509.NewCertPool(),
	}
	for name, mutate := range map[string]func(*Config){
		"no certificate":      func(c *Config) { c.GetCertificate = nil },
		"no client CAs":       func(c *Config) { c.ClientCAs = nil },
		"negative rate":       func(c *Config) { c.PublishRate = -1 },
		"keepalive too long":  func(c *Config) { c.MaxKeepalive = 70000 * time.Second },
		"negative timeout":    func(c *Config) { c.HandshakeTimeout = -time.Second },
		"negative connection": func(c *Config) { c.MaxConnections = -1 },
		"write timeout 10ms":  func(c *Config) { c.WriteTimeout = 10 * time.Millisecond },
	} {
		cfg := ok
		mutate(&cfg)
		if _, err := New(cfg, db); err == nil {
			t.Errorf("%s: New accepted the config", name)
		}
	}
	if _, err := New(ok, nil); err == nil {
		t.Error("New accepted a nil store")
	}
	b, err := New(ok, db)
	if err != nil {
		t.Fatal(err)
	}
	if b.cfg.Addr != ":8883" || b.cfg.HandshakeTimeout != 10*time.Second || b.cfg.MaxConnections != 10000 ||
		b.cfg.MaxPacketSize != 256<<10 || b.cfg.WriteQueue != 128 || b.cfg.PublishRate != 100 || b.cfg.PublishBurst != 200 ||
		b.cfg.WriteTimeout != 10*time.Second {
		t.Fatalf("defaults not applied: %+v", b.cfg)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
}
