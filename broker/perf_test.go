package broker

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/store"
)

// Tests of the fast paths: each must answer exactly what the slow path it
// replaces would.

func TestFastACLPathAgreesWithAllowed(t *testing.T) {
	g := &grant{id: "dev-a", role: store.RoleDevice, telemetry: "devices/dev-a/telemetry"}
	c := &conn{}
	c.grant.Store(g)
	for _, topic := range []string{
		"devices/dev-a/telemetry",
		"devices/dev-a/telemetry/temp",
		"devices/dev-a/telemetry/a/b/c",
		"devices/dev-a/telemetry/",
		"devices/dev-a/telemetry//x",
		"devices/dev-a/telemetry/+",
		"devices/dev-a/telemetry/#",
		"devices/dev-a/telemetry/\x00",
		"devices/dev-a/telemetry/\xff",
		"devices/dev-a/telemetryx",
		"devices/dev-a/events/boot",
		"devices/dev-a/status",
		"devices/dev-b/telemetry",
		"devices/+/telemetry",
	} {
		for _, write := range []bool{true, false} {
			if got, want := c.allowed(topic, write), Allowed(g.role, g.id, topic, write); got != want {
				t.Errorf("allowed(%q, write=%v) = %v, Allowed says %v", topic, write, got, want)
			}
		}
	}
	c.revoked.Store(true)
	if c.allowed("devices/dev-a/telemetry", true) {
		t.Error("a revoked connection may still publish telemetry")
	}
}

func TestDeadlineRefreshesAreCoalesced(t *testing.T) {
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	c := &conn{Conn: tls.Server(a, &tls.Config{})}
	base := time.Now().Add(90 * time.Second)
	if err := c.SetDeadline(base); err != nil {
		t.Fatal(err)
	}
	if !c.deadline.Equal(base) || c.deadlineSlack <= 0 || c.deadlineSlack > 90*time.Second/16 {
		t.Fatalf("after the first deadline: %v, slack %v", c.deadline, c.deadlineSlack)
	}
	// A refresh within a sixteenth of the window keeps the deadline set.
	if err := c.SetDeadline(base.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if !c.deadline.Equal(base) {
		t.Fatalf("a 1 s refresh of a 90 s window moved the deadline to %v", c.deadline)
	}
	// A larger one is applied.
	later := base.Add(10 * time.Second)
	if err := c.SetDeadline(later); err != nil {
		t.Fatal(err)
	}
	if !c.deadline.Equal(later) {
		t.Fatalf("a 10 s refresh left the deadline at %v", c.deadline)
	}
	// An earlier deadline is always applied.
	earlier := time.Now().Add(time.Second)
	if err := c.SetDeadline(earlier); err != nil {
		t.Fatal(err)
	}
	if !c.deadline.Equal(earlier) {
		t.Fatalf("an earlier deadline was not applied: %v", c.deadline)
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !c.deadline.IsZero() {
		t.Fatal("clearing the deadline was not applied")
	}

	// The deadline applied is the one the connection obeys.
	if err := c.SetDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("read past the deadline: %v, want a timeout", err)
	}
}

func TestServerChainLeavesOutTheRoot(t *testing.T) {
	root, rootKey := selfSigned(t, "root")
	inter := signed(t, "intermediate", true, root, rootKey)
	leaf := signed(t, "leaf", false, root, rootKey)
	for _, tc := range []struct {
		name  string
		chain [][]byte
		want  int
	}{
		{"leaf alone", [][]byte{leaf}, 1},
		{"leaf and root", [][]byte{leaf, root.Raw}, 1},
		{"leaf and intermediate", [][]byte{leaf, inter}, 2},
		{"leaf, intermediate and root", [][]byte{leaf, inter, root.Raw}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &tls.Certificate{Certificate: tc.chain}
			got := withoutRoot(src)
			if len(got.Certificate) != tc.want {
				t.Fatalf("chain of %d, want %d", len(got.Certificate), tc.want)
			}
			if len(src.Certificate) != len(tc.chain) {
				t.Fatal("the caller's certificate was changed")
			}
		})
	}

	// The trimmed copy is made once per certificate and follows renewals.
	current := &tls.Certificate{Certificate: [][]byte{leaf, root.Raw}}
	b := &Broker{cfg: Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return current, nil }}}
	first, _ := b.getCertificate(nil)
	again, _ := b.getCertificate(nil)
	if first != again || len(first.Certificate) != 1 {
		t.Fatalf("second call: %p (%d certs), first %p", again, len(again.Certificate), first)
	}
	current = &tls.Certificate{Certificate: [][]byte{inter, root.Raw}}
	if renewed, _ := b.getCertificate(nil); renewed == first || string(renewed.Certificate[0]) != string(inter) {
		t.Fatal("a renewed certificate was not picked up")
	}
}

func selfSigned(tb testing.TB, cn string) (*x509.Certificate, *ecdsa.PrivateKey) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c, key
}

func signed(tb testing.TB, cn string, isCA bool, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) []byte {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: isCA, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

func TestClientsVerifyTheTrimmedChain(t *testing.T) {
	// The fleet CA's server certificates carry the self-signed CA at the
	// end of their chain, which the broker leaves out.
	f := newFixture(t, nil)
	conn, err := tls.Dial("tcp", f.addr, f.clientTLS(f.device(t, "dev-a")))
	if err != nil {
		t.Fatalf("handshake with the trimmed chain: %v", err)
	}
	defer conn.Close()
	peers := conn.ConnectionState().PeerCertificates
	if len(peers) != 1 || peers[0].IsCA {
		t.Fatalf("server sent %d certificates, want the leaf alone", len(peers))
	}
}

// TestDeviceTelemetryReachesLateSubscribers checks the delivery shortcut:
// while no service subscribes, device publishes skip mochi's delivery;
// once one does, every later publish reaches it, QoS 0 and 1; when it
// unsubscribes or its clean session ends, the count falls back to zero.
func TestDeviceTelemetryReachesLateSubscribers(t *testing.T) {
	f := newFixture(t, nil)
	dev := connect(t, f.pahoOpts("dev-a", f.clientTLS(f.device(t, "dev-a"))))
	// Devices' own subscriptions do not count: no device can receive
	// another device's publishes.
	if err := wait(t, dev.Subscribe("devices/dev-a/commands/#", 1, func(paho.Client, paho.Message) {})); err != nil {
		t.Fatal(err)
	}
	for q := range byte(2) {
		if err := wait(t, dev.Publish("devices/dev-a/telemetry", q, false, "before")); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.b.nwatchers.Load(); n != 0 {
		t.Fatalf("%d watchers before any service subscribed", n)
	}

	svc := connect(t, f.pahoOpts("svc", f.clientTLS(f.service(t, "svc"))))
	got := make(chan paho.Message, 16)
	if err := wait(t, svc.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) { got <- m })); err != nil {
		t.Fatal(err)
	}
	if n := f.b.nwatchers.Load(); n != 1 {
		t.Fatalf("%d watchers after one subscription", n)
	}
	for q := range byte(2) {
		if err := wait(t, dev.Publish("devices/dev-a/telemetry", q, false, "after")); err != nil {
			t.Fatal(err)
		}
		if m := receive(t, got, "telemetry"); string(m.Payload()) != "after" {
			t.Fatalf("QoS %d: service got %q", q, m.Payload())
		}
	}

	if err := wait(t, svc.Unsubscribe("devices/+/telemetry")); err != nil {
		t.Fatal(err)
	}
	if n := f.b.nwatchers.Load(); n != 0 {
		t.Fatalf("%d watchers after unsubscribing", n)
	}
	if err := wait(t, svc.Subscribe("devices/+/telemetry", 0, func(_ paho.Client, m paho.Message) { got <- m })); err != nil {
		t.Fatal(err)
	}
	svc.Disconnect(0) // clean session: mochi drops its subscriptions
	eventually(t, func() bool { return f.b.nwatchers.Load() == 0 }, "watchers to fall to 0 after the service left")
	select {
	case m := <-got:
		t.Fatalf("unexpected delivery %q", m.Payload())
	default:
	}
}

func TestQoS0BackpressureInsteadOfLoss(t *testing.T) {
	w := newTelemetryWriter(nil, zerolog.Nop(), newCounters(), func([]store.Message) {})
	// The writer is not running: fill its queue.
	for range cap(w.async) {
		if !w.storeAsync(store.Message{DeviceID: "dev-a"}) {
			t.Fatal("dropped with room in the queue")
		}
	}
	done := make(chan bool, 1)
	go func() { done <- w.storeAsync(store.Message{DeviceID: "dev-b"}) }()
	<-w.async // the writer takes one message
	if !receive(t, done, "the waiting publisher") {
		t.Fatal("dropped although room was made")
	}
	go func() { done <- w.storeAsync(store.Message{DeviceID: "dev-c"}) }()
	close(w.done) // the writer has ended
	if receive(t, done, "the waiting publisher") {
		t.Fatal("queued after the writer ended")
	}
}

// presenceFailing fails its first fails SetPresence calls, as a full
// disk does.
type presenceFailing struct {
	*store.DB
	fails atomic.Int32
}

func (p *presenceFailing) SetPresence(ctx context.Context, ps ...store.Presence) error {
	if p.fails.Add(-1) >= 0 {
		return fmt.Errorf("set presence: %w", syscall.ENOSPC)
	}
	return p.DB.SetPresence(ctx, ps...)
}

// A presence change that could not be written stays pending, is shown,
// and is written once the store takes writes again.
func TestPresenceKeptWhenWriteFails(t *testing.T) {
	db := openStore(t, filepath.Join(t.TempDir(), "fleet.db"))
	st := &presenceFailing{DB: db}
	st.fails.Store(2)
	stats := newCounters()
	var logs bytes.Buffer
	w := newTelemetryWriter(st, zerolog.New(&logs), stats, func([]store.Message) {})
	w.presenceRetry = 10 * time.Millisecond
	go w.run()
	seen := store.Presence{DeviceID: "dev-1", LastSeen: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	w.setPresence(seen)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for {
		ps, err := db.Presences(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := ps["dev-1"]; ok {
			if !got.LastSeen.Equal(seen.LastSeen) {
				t.Fatalf("stored %+v, want %+v", got, seen)
			}
			break
		}
		if p, ok := w.unwrittenPresence()["dev-1"]; !ok || p != seen {
			t.Fatalf("the change is neither stored nor pending (unwritten: %+v)", w.unwrittenPresence())
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatal("presence never stored after the store took writes again")
		}
	}
	w.close() // the writer's logs are complete
	if n := stats.presenceFailed.Load(); n != 2 {
		t.Errorf("%d failed presence writes counted, want 2", n)
	}
	if n := strings.Count(logs.String(), "storing presence failed"); n != 1 {
		t.Errorf("failure logged %d times, want once:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "presence stored again") {
		t.Errorf("recovery not logged:\n%s", logs.String())
	}
}

// presenceLog records when each SetPresence call came and what it wrote.
type presenceLog struct {
	*store.DB
	mu    sync.Mutex
	calls []time.Time
}

func (p *presenceLog) SetPresence(ctx context.Context, ps ...store.Presence) error {
	p.mu.Lock()
	p.calls = append(p.calls, time.Now())
	p.mu.Unlock()
	return p.DB.SetPresence(ctx, ps...)
}

func TestPresenceChangesShareCommits(t *testing.T) {
	db := openStore(t, filepath.Join(t.TempDir(), "fleet.db"))
	log := &presenceLog{DB: db}
	w := newTelemetryWriter(log, zerolog.Nop(), newCounters(), func([]store.Message) {})
	go w.run()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

	// Changes keep coming for three windows: each is written at most once
	// per window, never one commit per change.
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	start, n := time.Now(), 0
	for time.Since(start) < 3*presenceDelay {
		w.setPresence(store.Presence{DeviceID: fmt.Sprint("dev-", n%10), Online: n%3 != 0, LastSeen: t0.Add(time.Duration(n) * time.Second)})
		n++
		<-tick.C
	}
	w.close() // writes what is pending

	log.mu.Lock()
	calls := log.calls
	log.mu.Unlock()
	if len(calls) < 3 {
		t.Fatalf("%d presence writes for %d changes over %s", len(calls), n, 3*presenceDelay)
	}
	// The last write is Close's, which does not wait.
	for i := 1; i < len(calls)-1; i++ {
		if d := calls[i].Sub(calls[i-1]); d < presenceDelay {
			t.Fatalf("presence writes %d and %d %s apart, want at least %s (%d changes, %d writes)", i-1, i, d, presenceDelay, n, len(calls))
		}
	}
	// Each device's last change is what the store holds.
	ps, err := db.Presences(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for k := max(n-10, 0); k < n; k++ {
		id := fmt.Sprint("dev-", k%10)
		want := store.Presence{DeviceID: id, Online: k%3 != 0, LastSeen: t0.Add(time.Duration(k) * time.Second)}
		if got := ps[id]; got.Online != want.Online || !got.LastSeen.Equal(want.LastSeen) {
			t.Errorf("%s: stored %+v, want %+v", id, got, want)
		}
	}
}
