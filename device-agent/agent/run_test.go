package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

const waitLong = 20 * time.Second

// fleet is an enrolled device with its fake server and broker.
type fleet struct {
	ca  *testCA
	srv *fakeServer
	brk *testBroker
	dir string
	id  string
}

func newFleet(tb testing.TB, lifetime time.Duration) *fleet {
	tb.Helper()
	ca := newTestCA(tb)
	f := &fleet{ca: ca, srv: newFakeServer(tb, ca), brk: newTestBroker(tb, ca), dir: filepath.Join(tb.TempDir(), "state"), id: "pi-1"}
	f.srv.set(func(s *fakeServer) { s.brokerURL = f.brk.url; s.lifetime = lifetime })
	enrollTest(tb, f.srv, f.dir, f.id)
	return f
}

func (f *fleet) topic(rel string) string { return deviceTopic(f.id, rel) }

func (f *fleet) config(tb testing.TB) Config {
	tb.Helper()
	proc := fakeTree(tb, map[string]string{
		"uptime":  "100.5 10\n",
		"loadavg": "0.10 0.20 0.30 1/100 42\n",
		"meminfo": fakeMeminfo,
	})
	return Config{
		StateDir:          f.dir,
		Interval:          20 * time.Millisecond,
		ProcRoot:          proc,
		SysRoot:           tb.TempDir(),
		DiskPath:          f.dir,
		Version:           "test",
		QueueSyncInterval: 50 * time.Millisecond,
		RetryMin:          20 * time.Millisecond,
		RetryMax:          200 * time.Millisecond,
		BlockedRetryMin:   time.Hour,
		BlockedRetryMax:   2 * time.Hour,
		ConnectRetryMin:   10 * time.Millisecond,
		ConnectRetryMax:   100 * time.Millisecond,
		ConnectTimeout:    5 * time.Second,
		PublishTimeout:    5 * time.Second,
		HTTPTimeout:       5 * time.Second,
		CertCheckInterval: 50 * time.Millisecond,
		StateInterval:     50 * time.Millisecond,
		ClockPollInterval: 50 * time.Millisecond,
		Logger:            zerolog.New(zerolog.NewTestWriter(tb)).Level(zerolog.DebugLevel),
	}
}

// startAgent runs the agent until the test ends or stop is called.
func startAgent(tb testing.TB, cfg Config) (r *runner, stop func() error) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r, err := startRunner(ctx, cfg)
	if err != nil {
		cancel()
		tb.Fatalf("startRunner: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- r.run(ctx) }()
	var stopped atomic.Bool
	stop = func() error {
		if stopped.Swap(true) {
			return nil
		}
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(waitLong):
			tb.Fatal("agent did not stop")
			return nil
		}
	}
	tb.Cleanup(func() { _ = stop() })
	return r, stop
}

func nextSerial(tb testing.TB, b *testBroker) string {
	tb.Helper()
	select {
	case s := <-b.serials:
		return s
	case <-time.After(waitLong):
		tb.Fatal("no connection to the broker")
		return ""
	}
}

func TestRunPublishesAndAnswersCommands(t *testing.T) {
	f := newFleet(t, time.Hour)
	_, stop := startAgent(t, f.config(t))

	if m := f.brk.next(t, f.topic(topicStatus), waitLong); m.payload != statusOnline || !m.retain {
		t.Fatalf("status %+v, want retained online", m)
	}
	var tel Telemetry
	m := f.brk.next(t, f.topic(topicTelemetry), waitLong)
	if err := json.Unmarshal([]byte(m.payload), &tel); err != nil {
		t.Fatal(err)
	}
	if tel.UptimeS != 100.5 || tel.Load5 != 0.2 || tel.MemTotalKB != 948304 || tel.AgentVersion != "test" || m.retain {
		t.Errorf("telemetry %+v (retained %v)", tel, m.retain)
	}

	if err := f.brk.srv.Publish(f.topic("commands/ping"), []byte(`{"nonce":"abc"}`), false, 1); err != nil {
		t.Fatal(err)
	}
	pong := f.brk.next(t, f.topic(topicPong), waitLong)
	if !strings.Contains(pong.payload, `"request":{"nonce":"abc"}`) {
		t.Errorf("pong %s", pong.payload)
	}
	if err := f.brk.srv.Publish(f.topic("commands/reboot"), nil, false, 1); err != nil {
		t.Fatal(err)
	}
	if ev := f.brk.next(t, f.topic(topicError), waitLong); !strings.Contains(ev.payload, `"code":"unknown_command"`) || !strings.Contains(ev.payload, `"command":"reboot"`) {
		t.Errorf("error event %s", ev.payload)
	}
	eventually(t, waitLong, "status shows connected", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Running && s.Connected && s.DeviceID == f.id
	})

	if err := stop(); err != nil {
		t.Fatalf("Run returned %v", err)
	}
	if m := f.brk.next(t, f.topic(topicStatus), waitLong); m.payload != statusOffline || !m.retain {
		t.Errorf("status at shutdown %+v, want retained offline", m)
	}
	s, err := ReadStatus(f.dir)
	if err != nil || s.Running || s.Connected {
		t.Errorf("status after stop: %+v, %v", s, err)
	}
}

func TestRunIntervalCommand(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	cfg.Interval = time.Hour // only the sample taken at start
	r, _ := startAgent(t, cfg)
	f.brk.next(t, f.topic(topicTelemetry), waitLong)
	if err := f.brk.srv.Publish(f.topic("commands/interval"), []byte("1s"), false, 1); err != nil {
		t.Fatal(err)
	}
	// Samples now come every second instead of every hour.
	f.brk.next(t, f.topic(topicTelemetry), 5*time.Second)
	if err := f.brk.srv.Publish(f.topic("commands/interval"), []byte("1ms"), false, 1); err != nil {
		t.Fatal(err)
	}
	if ev := f.brk.next(t, f.topic(topicError), waitLong); !strings.Contains(ev.payload, "invalid_payload") {
		t.Errorf("error event %s", ev.payload)
	}
	_ = r
}

func TestRunBuffersWhileBrokerIsDown(t *testing.T) {
	f := newFleet(t, time.Hour)
	r, _ := startAgent(t, f.config(t))
	f.brk.next(t, f.topic(topicTelemetry), waitLong)

	f.brk.gate.setOpen(false)
	// Nothing is removed without a PUBACK, so the queue grows.
	eventually(t, waitLong, "telemetry buffered", func() bool {
		p, _, _ := r.q.Stats()
		return p >= 20
	})
	eventually(t, waitLong, "status shows disconnected", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Running && !s.Connected
	})
	buffered, err := r.q.Peek(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, rec := range buffered {
		var tel Telemetry
		if err := json.Unmarshal(rec.Payload, &tel); err != nil {
			t.Fatal(err)
		}
		want = append(want, tel.Time)
	}

	f.brk.gate.setOpen(true)
	// Collect telemetry until the last buffered sample arrived.
	seen := map[string]bool{}
	var order []string
	last := want[len(want)-1]
	for !seen[last] {
		m := f.brk.next(t, f.topic(topicTelemetry), waitLong)
		var tel Telemetry
		if err := json.Unmarshal([]byte(m.payload), &tel); err != nil {
			t.Fatal(err)
		}
		if !seen[tel.Time] { // at least once: a resent window may repeat
			seen[tel.Time] = true
			order = append(order, tel.Time)
		}
	}
	for i := 1; i < len(order); i++ {
		if order[i] <= order[i-1] {
			t.Fatalf("delivered out of order: %s after %s", order[i], order[i-1])
		}
	}
	for _, w := range want {
		if !seen[w] {
			t.Fatalf("buffered sample %s never delivered", w)
		}
	}
	eventually(t, waitLong, "queue drained", func() bool {
		p, _, _ := r.q.Stats()
		return p < 5
	})
}

// TestRunStatusSeesTheQueueDrain: once the backlog is delivered, status
// says so within a queue sync, not at the next periodic save (QA: "86
// pending (counted 1m ago)" after all 86 were delivered).
func TestRunStatusSeesTheQueueDrain(t *testing.T) {
	f := newFleet(t, time.Hour)
	f.brk.gate.setOpen(false)
	cfg := f.config(t)
	cfg.StateInterval = time.Hour // the periodic save never comes
	r, _ := startAgent(t, cfg)
	eventually(t, waitLong, "a backlog in status", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.QueuePending >= 3
	})
	r.setInterval(time.Hour) // no new samples: the queue can drain to 0
	f.brk.gate.setOpen(true)
	eventually(t, waitLong, "status shows the queue drained", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Connected && s.QueuePending == 0
	})
}

func TestRunRenewsByCommandWithoutRestart(t *testing.T) {
	f := newFleet(t, time.Hour)
	_, _ = startAgent(t, f.config(t))
	first := nextSerial(t, f.brk)
	// Telemetry is sent only once the command subscription is in place.
	f.brk.next(t, f.topic(topicTelemetry), waitLong)

	if err := f.brk.srv.Publish(f.topic("commands/renew"), nil, false, 1); err != nil {
		t.Fatal(err)
	}
	second := nextSerial(t, f.brk)
	if second == first {
		t.Fatal("reconnected with the old certificate")
	}
	id, err := loadIdentity(f.dir, zerolog.Nop())
	if err != nil || id.serial() != second {
		t.Fatalf("broker saw %s, disk has %v (%v)", second, id, err)
	}
	// The new session works: telemetry keeps flowing.
	f.brk.next(t, f.topic(topicStatus), waitLong)
	f.brk.next(t, f.topic(topicTelemetry), waitLong)
	drain(f.brk)
	f.brk.next(t, f.topic(topicTelemetry), waitLong)
	if st, _ := readState(f.dir); st.LastRenewal.IsZero() {
		t.Error("last renewal not recorded")
	}
	f.awaitCommands(t)
	// A retained renew command is refused, not executed on every connect.
	// Delivered live first, it comes too soon after the renewal; replayed
	// on the next subscription, it is refused as retained. (An empty
	// payload would clear it.)
	if err := f.brk.srv.Publish(f.topic("commands/renew"), []byte("now"), true, 1); err != nil {
		t.Fatal(err)
	}
	if ev := f.brk.next(t, f.topic(topicError), waitLong); !strings.Contains(ev.payload, `"code":"rate_limited"`) {
		t.Errorf("error event %s, want rate_limited", ev.payload)
	}
	f.brk.gate.setOpen(false) // cut the session: the agent connects and subscribes again
	f.brk.gate.setOpen(true)
	if ev := f.brk.next(t, f.topic(topicError), waitLong); !strings.Contains(ev.payload, "retained_command") {
		t.Errorf("error event %s, want retained_command", ev.payload)
	}
	_ = f.brk.srv.Publish(f.topic("commands/renew"), nil, true, 0) // clear the retained message
	if mtls, proof := f.srv.counts(); mtls != 1 || proof != 0 {
		t.Errorf("renewals mtls=%d proof=%d, want the one the first command asked for", mtls, proof)
	}
}

// A backend stuck in a loop sends renew after renew: one is obeyed, the
// others are answered with rate_limited until RenewCommandInterval has
// passed since that renewal.
func TestRunRenewCommandRateLimit(t *testing.T) {
	f := newFleet(t, time.Hour)
	var offset atomic.Int64
	cfg := f.config(t)
	cfg.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	_, _ = startAgent(t, cfg)
	first := nextSerial(t, f.brk)
	f.awaitCommands(t)

	if err := f.brk.srv.Publish(f.topic("commands/renew"), nil, false, 1); err != nil {
		t.Fatal(err)
	}
	second := nextSerial(t, f.brk)
	if second == first {
		t.Fatal("reconnected with the old certificate")
	}
	f.awaitCommands(t) // the new session subscribed
	renewedAt := time.Now()
	for i := range 5 {
		if err := f.brk.srv.Publish(f.topic("commands/renew"), nil, false, 1); err != nil {
			t.Fatal(err)
		}
		ev := f.brk.next(t, f.topic(topicError), waitLong)
		var got struct{ Command, Code, Message string }
		if err := json.Unmarshal([]byte(ev.payload), &got); err != nil {
			t.Fatal(err)
		}
		if got.Command != "renew" || got.Code != "rate_limited" || !strings.Contains(got.Message, "10m0s") {
			t.Fatalf("renew command %d answered %s, want rate_limited naming the interval", i+2, ev.payload)
		}
		// The message says from when a command is obeyed again.
		var from time.Time
		if _, after, ok := strings.Cut(got.Message, "the next from "); ok {
			from, _ = time.Parse(time.RFC3339, after)
		}
		if from.Before(renewedAt.Add(9*time.Minute)) || from.After(time.Now().Add(10*time.Minute)) {
			t.Errorf("message %q: want the time 10 minutes after the renewal", got.Message)
		}
	}
	if mtls, _ := f.srv.counts(); mtls != 1 {
		t.Fatalf("%d renewals for 6 renew commands, want 1", mtls)
	}
	select {
	case s := <-f.brk.serials:
		t.Fatalf("reconnected (serial %s) for a refused command", s)
	default:
	}

	// Ten minutes later (by the agent's clock) a command is obeyed again.
	offset.Store(int64(10*time.Minute + time.Second))
	if err := f.brk.srv.Publish(f.topic("commands/renew"), nil, false, 1); err != nil {
		t.Fatal(err)
	}
	if third := nextSerial(t, f.brk); third == second {
		t.Fatal("reconnected with the old certificate")
	}
	if mtls, _ := f.srv.counts(); mtls != 2 {
		t.Errorf("%d renewals, want 2", mtls)
	}
}

// awaitCommands pings the device until it answers: its session has
// subscribed to its commands. (Telemetry is no proof after a reconnection:
// the previous session's may still be on its way.)
func (f *fleet) awaitCommands(tb testing.TB) {
	tb.Helper()
	deadline := time.NewTimer(waitLong)
	defer deadline.Stop()
	for {
		if err := f.brk.srv.Publish(f.topic("commands/ping"), []byte("subscribed?"), false, 1); err != nil {
			tb.Fatal(err)
		}
		retry := time.NewTimer(200 * time.Millisecond)
		for waiting := true; waiting; {
			select {
			case m := <-f.brk.msgs:
				if m.topic == f.topic(topicPong) {
					retry.Stop()
					return
				}
			case <-retry.C:
				waiting = false
			case <-deadline.C:
				tb.Fatal("the device never answered a ping")
			}
		}
	}
}

// drain discards the messages received so far.
func drain(b *testBroker) {
	for {
		select {
		case <-b.msgs:
		default:
			return
		}
	}
}

func TestRunRenewsOnScheduleWithoutRestart(t *testing.T) {
	// 6 s of life from receipt (the fake server backdates NotBefore by a
	// minute, which must not make the renewal immediate): the renewal is
	// due at 2/3 ± 5 %, 3.7 s to 4.3 s in.
	f := newFleet(t, 6*time.Second)
	id, err := loadIdentity(f.dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	st, _ := readState(f.dir)
	earliest := renewalTime(st.EnrolledAt, id.leaf.NotAfter, 0)
	_, _ = startAgent(t, f.config(t))
	first := nextSerial(t, f.brk)
	second := nextSerial(t, f.brk)
	now := time.Now()
	if second == first {
		t.Fatal("reconnected with the old certificate")
	}
	if now.Before(earliest) || now.After(id.leaf.NotAfter) {
		t.Errorf("renewed and reconnected at %v, want between %v (2/3 of the lifetime - 5 %%) and expiry %v",
			now.Sub(st.EnrolledAt), earliest.Sub(st.EnrolledAt), id.leaf.NotAfter.Sub(st.EnrolledAt))
	}
	if mtls, proof := f.srv.counts(); mtls != 1 || proof != 0 {
		t.Errorf("renewals mtls=%d proof=%d, want exactly one over mTLS", mtls, proof)
	}
}

func TestRunAdoptsRenewalByCommandLine(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	_, _ = startAgent(t, cfg)
	first := nextSerial(t, f.brk)
	if _, err := Renew(context.Background(), Config{StateDir: f.dir}); err != nil {
		t.Fatal(err)
	}
	if second := nextSerial(t, f.brk); second == first {
		t.Fatal("running agent did not switch to the renewed certificate")
	}
	if mtls, _ := f.srv.counts(); mtls != 1 {
		t.Errorf("%d renewals, want only the command line's", mtls)
	}
}

// A device the server turns away for good — revoked, or with a certificate
// the server has no record of (restored from an older backup) — says so
// in status and backs off for long instead of hammering the server.
func TestRunTurnedAwayBacksOff(t *testing.T) {
	for _, c := range []struct {
		name, cond, code string
		setup            func(s *fakeServer, id string)
	}{
		{"revoked", CondRevoked, "device_revoked", func(s *fakeServer, id string) { s.revoked[id] = true }},
		{"certificate unknown", CondCertUnknown, "cert_invalid", func(s *fakeServer, _ string) { s.forgotten = true }},
		{"re-provisioned elsewhere", CondSuperseded, "cert_revoked", func(s *fakeServer, _ string) { s.superseded = true }},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFleet(t, time.Hour)
			r, _ := startAgent(t, f.config(t))
			serial := nextSerial(t, f.brk)
			f.srv.set(func(s *fakeServer) { c.setup(s, f.id) })
			f.brk.revoke(serial)
			f.brk.gate.setOpen(false) // cut the live session
			f.brk.gate.setOpen(true)

			eventually(t, waitLong, "status shows "+c.cond, func() bool {
				s, err := ReadStatus(f.dir)
				return err == nil && s.Condition == c.cond && strings.Contains(s.LastError, c.code)
			})
			until, blocked := r.blocked(time.Now())
			if !blocked || time.Until(until) < 25*time.Minute {
				t.Errorf("blocked=%v until %v: want a long backoff (BlockedRetryMin 1h, jittered to ≥ 30m)", blocked, until)
			}
			mtls, proof := f.srv.counts()
			if mtls+proof > 2 {
				t.Errorf("%d renewal attempts, want at most mTLS + proof once", mtls+proof)
			}
			if len(f.brk.serials) != 0 {
				t.Error("the broker accepted the refused certificate")
			}
			// Samples that can never be delivered are not written.
			before, _, _ := r.q.Stats()
			r.sampleOnce()
			r.sampleOnce()
			if after, _, _ := r.q.Stats(); after != before {
				t.Errorf("queue %d → %d while turned away, want no new samples", before, after)
			}
		})
	}
}

func TestRunBrokerRefusalTriggersOneRenewal(t *testing.T) {
	// The broker refuses the current certificate (say, revoked by serial),
	// the server still renews: the agent renews once and reconnects.
	f := newFleet(t, time.Hour)
	_, _ = startAgent(t, f.config(t))
	first := nextSerial(t, f.brk)
	f.brk.revoke(first)
	f.brk.gate.setOpen(false)
	f.brk.gate.setOpen(true)
	if second := nextSerial(t, f.brk); second == first {
		t.Fatal("reconnected with the refused certificate")
	}
	if mtls, proof := f.srv.counts(); mtls != 1 || proof != 0 {
		t.Errorf("renewals mtls=%d proof=%d, want one", mtls, proof)
	}
}

// TestRunFullBrokerIsNoRefusal: a broker at its connection limit closes
// new sockets at once, before the TLS handshake asks for a certificate.
// That is no refusal of the certificate: the agent retries without
// renewing (QA: every device over fleetmq's --max-connections renewed its
// certificate after three such closes, a fleet over the limit all at
// once), and says why it cannot connect.
func TestRunFullBrokerIsNoRefusal(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	var logs lockedBuffer
	cfg.Logger = zerolog.New(&logs)
	startAgent(t, cfg)
	first := nextSerial(t, f.brk)
	f.brk.gate.setOpen(false) // the live session cut, new sockets closed at once
	eventually(t, waitLong, "ten attempts closed at once", func() bool {
		return strings.Count(logs.String(), "broker connection failed") >= 10
	})
	if mtls, proof := f.srv.counts(); mtls+proof != 0 {
		t.Errorf("renewals mtls=%d proof=%d for a full broker, want none", mtls, proof)
	}
	eventually(t, waitLong, "status says the broker is full", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && strings.Contains(s.LastError, "connection limit")
	})
	f.brk.gate.setOpen(true)
	if again := nextSerial(t, f.brk); again != first {
		t.Errorf("reconnected with serial %s, want the unchanged %s", again, first)
	}
}

// TestRunRefusalAfterSessionIsCheckedAtOnce: broker refusals are checked
// with the server at most once per RetryMax, unless the broker accepted
// the device in between: a refusal after a working session (revoked, or
// the server restored from an older backup) is checked at once, not up to
// an hour later.
func TestRunRefusalAfterSessionIsCheckedAtOnce(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	cfg.RetryMax = time.Hour
	r, _ := startAgent(t, cfg)
	serialNow := func() string {
		id, _, _ := r.current()
		return id.leaf.SerialNumber.Text(16)
	}
	// Connected is saved once the session is up (status published), and
	// cleared when it ends, before the next attempt can be refused.
	connected := func() bool {
		st, err := readState(f.dir)
		return err == nil && st.Connected
	}
	eventually(t, waitLong, "the first session", connected)
	for i := 1; i <= 2; i++ {
		serial := serialNow()
		f.brk.revoke(serial)
		f.brk.gate.setOpen(false)
		f.brk.gate.setOpen(true)
		eventually(t, waitLong, fmt.Sprintf("a session on a renewed certificate after refusal %d", i), func() bool {
			return serialNow() != serial && connected()
		})
		if mtls, _ := f.srv.counts(); mtls != i {
			t.Fatalf("after refusal %d: %d renewals, want %d", i, mtls, i)
		}
	}
}

// A broker refusal of a certificate already replaced (an attempt with the
// old one, refused while the renewal ran) does not renew again; one of the
// certificate in use does.
func TestRunRefusalOfReplacedCertificateIsIgnored(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	var logs lockedBuffer
	cfg.Logger = zerolog.New(&logs)
	r, _ := startAgent(t, cfg)
	nextSerial(t, f.brk)
	r.hintRenew("0") // no certificate of this fleet has serial 0
	eventually(t, waitLong, "the stale refusal ignored", func() bool {
		return strings.Contains(logs.String(), "broker refusal of a certificate already replaced: ignored")
	})
	if mtls, _ := f.srv.counts(); mtls != 0 {
		t.Fatalf("%d renewals for the refusal of a replaced certificate, want 0", mtls)
	}
	id, _, _ := r.current()
	r.hintRenew(id.serial())
	eventually(t, waitLong, "the refusal of the certificate in use checked", func() bool {
		mtls, _ := f.srv.counts()
		return mtls == 1
	})
}

// TestRunFailedRefusalCheckIsNotRetriedEarly: a renewal asked for by a
// broker refusal, of a certificate not yet due, that fails (the enrollment
// server is down) is not retried before the certificate is due, and the
// log does not say it is (QA: "retry_in=8.588s", and no retry came).
func TestRunFailedRefusalCheckIsNotRetriedEarly(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	cfg.RetryMin, cfg.RetryMax = 10*time.Millisecond, time.Hour
	var logs lockedBuffer
	cfg.Logger = zerolog.New(&logs)
	r, _ := startAgent(t, cfg)
	first := nextSerial(t, f.brk)
	f.srv.set(func(f *fakeServer) { f.renewDown = true })
	f.brk.revoke(first)
	f.brk.gate.setOpen(false)
	f.brk.gate.setOpen(true)
	eventually(t, waitLong, "the failed check logged", func() bool {
		return strings.Contains(logs.String(), "renewal check failed; not retried before the certificate is due")
	})
	// More refusals come (the broker still refuses); none is checked
	// again within RetryMax, and nothing promised a retry.
	f.brk.gate.setOpen(false)
	f.brk.gate.setOpen(true)
	eventually(t, waitLong, "another refused attempt", func() bool {
		return strings.Count(logs.String(), "broker connection failed") >= 2
	})
	f.srv.mu.Lock()
	reqs := f.srv.renewReqs
	f.srv.mu.Unlock()
	if reqs != 1 {
		t.Errorf("%d renewal requests, want 1", reqs)
	}
	if strings.Contains(logs.String(), `"renewal failed"`) {
		t.Errorf("a retry was announced:\n%s", logs.String())
	}
	if id, _, _ := r.current(); id.leaf.SerialNumber.Text(16) != first {
		t.Error("the certificate changed")
	}
}

// TestRunLateDropsAreNotRefusals: a broker that asks for the certificate
// and closes connections without a word soon after the dial may be
// refusing the certificate (three in a row ask the server); one that
// closes them late is a link too slow for its handshake deadline, and
// renewing a valid certificate does not help (QA: agents on a 4 kbit/s
// link renewed). (Closed before it asks, see TestRunFullBrokerIsNoRefusal.)
func TestRunLateDropsAreNotRefusals(t *testing.T) {
	for _, tc := range []struct {
		name   string
		window time.Duration
		renew  bool
	}{
		{"late", 50 * time.Millisecond, false},
		{"soon", 10 * time.Second, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFleet(t, time.Hour)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			accepted := make(chan struct{}, 100)
			srvTLS := &tls.Config{Certificates: []tls.Certificate{f.ca.serverTLS(t)}, ClientAuth: tls.RequestClientCert}
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					accepted <- struct{}{}
					go func() {
						// The certificate asked for, then silence and a
						// cut: a refusal whose alert the reset overtook,
						// or a handshake deadline.
						time.AfterFunc(200*time.Millisecond, func() { c.Close() })
						_ = tls.Server(c, srvTLS).Handshake()
					}()
				}
			}()
			if err := (&stateStore{dir: f.dir}).update(context.Background(), func(s *State) { s.BrokerURL = "mqtts://" + ln.Addr().String() }); err != nil {
				t.Fatal(err)
			}
			cfg := f.config(t)
			cfg.RefusalWindow = tc.window
			_, _ = startAgent(t, cfg)
			renewals := func() int {
				f.srv.mu.Lock()
				defer f.srv.mu.Unlock()
				return f.srv.renewReqs
			}
			if tc.renew {
				eventually(t, waitLong, "a renewal asked by the drops", func() bool { return renewals() > 0 })
				return
			}
			for i := range 6 {
				select {
				case <-accepted:
				case <-time.After(waitLong):
					t.Fatalf("%d connection attempts, want 6", i)
				}
			}
			if n := renewals(); n != 0 {
				t.Errorf("%d renewal requests after 6 drops 200 ms after the dial", n)
			}
		})
	}
}

// TestRunClockAheadDoesNotLoop: with the clock ahead by more than the
// certificate lifetime every certificate the server issues is expired on
// arrival; the agent renewed again at once, about 130 times a second
// (found by hand). It now renews once, reports the clock and waits.
func TestRunClockAheadDoesNotLoop(t *testing.T) {
	f := newFleet(t, time.Hour)
	cfg := f.config(t)
	var offset atomic.Int64
	offset.Store(int64(2 * time.Hour))
	cfg.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	cfg.Grace = 24 * time.Hour
	cfg.RetryMin, cfg.RetryMax = time.Hour, 2*time.Hour
	_, _ = startAgent(t, cfg)
	eventually(t, waitLong, "status shows the clock is wrong", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Condition == CondClockWrong
	})
	if mtls, proof := f.srv.counts(); mtls+proof != 1 {
		t.Fatalf("%d renewals (mtls %d, proof %d), want 1", mtls+proof, mtls, proof)
	}
	// Time sync: the condition clears within a clock poll (not at the
	// next renewal attempt, an hour away) and the device connects.
	offset.Store(0)
	eventually(t, waitLong, "condition cleared and connected", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Condition == "" && s.Connected
	})
}

// lockedBuffer is a log sink safe for the agent's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRunExpiredSaidOnce: while the certificate is expired and cannot be
// renewed (the enrollment server is down), the agent says so once, not at
// every connection check (every 30 s for up to the 7-day grace, on an SD
// card's journal).
func TestRunExpiredSaidOnce(t *testing.T) {
	f := newFleet(t, time.Hour)
	f.srv.srv.Close() // renewals fail
	cfg := f.config(t)
	cfg.Now = func() time.Time { return time.Now().Add(2 * time.Hour) } // expired, within the grace
	var logs lockedBuffer
	cfg.Logger = zerolog.New(&logs)
	_, _ = startAgent(t, cfg)
	// Several renewal attempts back off 20–200 ms; connection checks run
	// every 50 ms meanwhile.
	eventually(t, waitLong, "several failed renewals", func() bool {
		return strings.Count(logs.String(), "renewal failed") >= 4
	})
	if n := strings.Count(logs.String(), "certificate expired; waiting for renewal"); n != 1 {
		t.Errorf("said %d times that the certificate expired, want once", n)
	}
}

func TestRunWaitsForClock(t *testing.T) {
	f := newFleet(t, time.Hour)
	var offset atomic.Int64
	offset.Store(int64(-48 * time.Hour)) // a Pi without RTC just after boot
	cfg := f.config(t)
	cfg.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	_, _ = startAgent(t, cfg)
	eventually(t, waitLong, "status shows waiting for clock", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Condition == CondClockWrong
	})
	select {
	case <-f.brk.serials:
		t.Fatal("connected with a clock before the certificate's NotBefore")
	default:
	}
	offset.Store(0) // time sync
	nextSerial(t, f.brk)
	eventually(t, waitLong, "condition cleared", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.Condition == "" && s.Connected
	})
}

// SIGTERM must stop the agent well within systemd's TimeoutStopSec (30 s)
// even while the broker has stopped answering in the middle of a
// connection; otherwise systemd kills it before it saves the queue's
// delivery pointer and state.
func TestRunStopsPromptlyWhileBrokerHangs(t *testing.T) {
	for _, c := range []struct {
		name    string
		connack bool
		packet  byte // what the broker sees last before the agent waits
	}{
		{"during connect", false, 0},
		{"waiting for a puback", true, 3}, // PUBLISH of the retained "online"
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFleet(t, time.Hour)
			hb := newHangingBroker(t, f.ca, c.connack)
			err := (&stateStore{dir: f.dir}).update(context.Background(), func(s *State) { s.BrokerURL = hb.url })
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.config(t)
			// Far beyond TimeoutStopSec: only watching the stop gets out in time.
			cfg.ConnectTimeout, cfg.PublishTimeout = time.Minute, time.Minute
			_, stop := startAgent(t, cfg)
			for p := byte(0xff); p != c.packet; {
				select {
				case p = <-hb.packets:
				case <-time.After(waitLong):
					t.Fatalf("the agent never reached the hanging broker")
				}
			}
			start := time.Now()
			if err := stop(); err != nil {
				t.Fatalf("Run returned %v", err)
			}
			// With a broker that answers nothing, the "offline" publish at
			// shutdown takes its whole bound (offlineTimeout).
			if d := time.Since(start); d > offlineTimeout+5*time.Second {
				t.Errorf("stopped %v after the cancel, want promptly", d.Round(time.Millisecond))
			}
			if st, err := readState(f.dir); err != nil || st.PID != 0 {
				t.Errorf("final state not saved: pid %d, %v", st.PID, err)
			}
		})
	}
}

// A broker that takes the TCP connection and never answers the TLS
// handshake is named as such, not as "context deadline exceeded" (QA).
func TestRunSaysBrokerHangsInHandshake(t *testing.T) {
	f := newFleet(t, time.Hour)
	hb := newHangingBroker(t, f.ca, false)
	err := (&stateStore{dir: f.dir}).update(context.Background(), func(s *State) { s.BrokerURL = hb.url })
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.config(t)
	cfg.ConnectTimeout = 100 * time.Millisecond
	_, _ = startAgent(t, cfg)
	eventually(t, waitLong, "the hanging handshake named", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && strings.Contains(s.LastError, "did not complete the TLS handshake within 100ms")
	})
}

func TestRunRefusesSecondAgent(t *testing.T) {
	f := newFleet(t, time.Hour)
	_, _ = startAgent(t, f.config(t))
	if err := Run(context.Background(), f.config(t)); !errors.Is(err, ErrAgentRunning) {
		t.Fatalf("second Run = %v, want ErrAgentRunning", err)
	}
}

func TestRunNotEnrolled(t *testing.T) {
	if err := Run(context.Background(), Config{StateDir: t.TempDir()}); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("Run = %v, want ErrNotEnrolled", err)
	}
}

// TestRunSameCertificateTwiceIsNoSwitch: after a renewal the file watcher
// may read the new cert.pem before the renewal has switched to it, and
// switch first; the renewal's own switch then finds the same certificate
// and must not reconnect a second time.
func TestRunSameCertificateTwiceIsNoSwitch(t *testing.T) {
	f := newFleet(t, time.Hour)
	r, _ := startAgent(t, f.config(t))
	nextSerial(t, f.brk)
	same, err := r.loadFromDisk(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_, _, changed := r.current()
	r.setIdentity(same, "")
	select {
	case <-changed:
		t.Fatal("switching to the certificate in use closed the change channel: a needless reconnect")
	default:
	}
	select {
	case s := <-f.brk.serials:
		t.Fatalf("reconnected (serial %s) for the same certificate", s)
	default:
	}
}
