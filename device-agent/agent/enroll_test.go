package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func testConfig(tb testing.TB, dir string) Config {
	tb.Helper()
	return Config{StateDir: dir}
}

func enrollTest(tb testing.TB, f *fakeServer, dir, id string) EnrollResult {
	tb.Helper()
	res, err := Enroll(context.Background(), testConfig(tb, dir), EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: id})
	if err != nil {
		tb.Fatalf("Enroll: %v", err)
	}
	return res
}

func TestEnroll(t *testing.T) {
	ca := newTestCA(t)
	f := newFakeServer(t, ca)
	dir := filepath.Join(t.TempDir(), "state")
	res := enrollTest(t, f, dir, "pi-1")
	if res.DeviceID != "pi-1" || res.AlreadyEnrolled || res.BrokerURL != "mqtts://127.0.0.1:1" {
		t.Fatalf("result %+v", res)
	}
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode %v, %v; want 0700", st.Mode().Perm(), err)
	}
	for name, mode := range map[string]os.FileMode{keyFile: 0o600, certFile: 0o644, caFile: 0o644, stateFile: 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, st.Mode().Perm(), mode)
		}
	}
	s, err := readState(dir)
	if err != nil || s.DeviceID != "pi-1" || s.ServerURL != f.srv.URL || s.BrokerURL != res.BrokerURL || s.EnrolledAt.IsZero() {
		t.Errorf("state %+v, %v", s, err)
	}
	id, err := loadIdentity(dir, zerolog.Nop())
	if err != nil || id.deviceID != "pi-1" {
		t.Fatalf("identity %v, %v", id, err)
	}
	for _, name := range []string{stateFile, certFile, caFile} {
		b, _ := os.ReadFile(filepath.Join(dir, name))
		if bytes.Contains(b, []byte(f.secret)) {
			t.Errorf("%s contains the token secret", name)
		}
	}

	// Enrolling again is a no-op that says so.
	keyBefore, _ := os.ReadFile(filepath.Join(dir, keyFile))
	res2 := enrollTest(t, f, dir, "pi-1")
	keyAfter, _ := os.ReadFile(filepath.Join(dir, keyFile))
	if !res2.AlreadyEnrolled || res2.DeviceID != "pi-1" || !bytes.Equal(keyBefore, keyAfter) {
		t.Errorf("second enroll: %+v, key changed %v", res2, !bytes.Equal(keyBefore, keyAfter))
	}

	// --force enrolls again, with a new key; the queue of the same device
	// is kept, and so are its counters.
	ss := &stateStore{dir: dir}
	if err := ss.update(context.Background(), func(s *State) { s.QueuePending, s.QueueDropped = 28, 3 }); err != nil {
		t.Fatal(err)
	}
	res3, err := Enroll(context.Background(), testConfig(t, dir), EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-1", Force: true})
	if err != nil || res3.AlreadyEnrolled {
		t.Fatalf("forced enroll: %+v, %v", res3, err)
	}
	if keyForced, _ := os.ReadFile(filepath.Join(dir, keyFile)); bytes.Equal(keyForced, keyAfter) {
		t.Error("--force kept the old key")
	}
	if st, err := readState(dir); err != nil || st.QueuePending != 28 || st.QueueDropped != 3 {
		t.Errorf("queue counters after --force: %+v %v, want 28 pending, 3 dropped", st, err)
	}
}

func TestEnrollWithoutIDUsesBoundID(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	res := enrollTest(t, f, t.TempDir(), "")
	if res.DeviceID != "bound-1" {
		t.Errorf("device id %q, want the token's bound id", res.DeviceID)
	}
}

// TestEnrollAtTheMQTTPort: a server that sends its certificate without a
// CA (fleetmq's MQTT listener) is refused with a hint at the likely
// mistake, the wrong port.
func TestEnrollAtTheMQTTPort(t *testing.T) {
	ca := newTestCA(t)
	f := newFakeServer(t, ca)
	leaf := ca.serverTLS(t)
	leaf.Certificate = leaf.Certificate[:1]
	srv := httptest.NewUnstartedServer(http.NotFoundHandler())
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{leaf}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	_, err := Enroll(context.Background(), testConfig(t, t.TempDir()), EnrollOptions{
		ServerURL: srv.URL, Token: f.goodToken(), DeviceID: "pi-1",
	})
	if !errors.Is(err, ErrCAMismatch) || !strings.Contains(err.Error(), "not the MQTT one") {
		t.Fatalf("Enroll against a server sending no CA = %v", err)
	}
}

func TestEnrollRefusesWrongCA(t *testing.T) {
	ca := newTestCA(t)
	f := newFakeServer(t, ca)
	other := newTestCA(t)
	dir := t.TempDir()
	_, err := Enroll(context.Background(), testConfig(t, dir), EnrollOptions{
		ServerURL: f.srv.URL, Token: f.token(sha256.Sum256(other.cert.Raw)), DeviceID: "pi-1",
	})
	if !errors.Is(err, ErrCAMismatch) {
		t.Fatalf("Enroll against another CA = %v, want ErrCAMismatch", err)
	}
	if !strings.Contains(err.Error(), "CA fingerprint mismatch") {
		t.Errorf("error %q does not say CA fingerprint mismatch", err)
	}
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Errorf("state folder holds %v (%v) although the server was refused", entries, err)
	}
	if _, proof := f.counts(); proof != 0 {
		t.Error("request reached the renew handler")
	}
}

// The commonest set-up mistake: the server's certificate does not name the
// host the device was given (fleetmq started without --hostname). The
// error says so and what to do, and nothing is written: not even the
// state folder, the lock or the enrollment key.
func TestEnrollServerNotNamedInCertificate(t *testing.T) {
	ca := newTestCA(t)
	ca.serverNames = []string{"fleet.example"}
	f := newFakeServer(t, ca)
	dir := filepath.Join(t.TempDir(), "state")
	_, err := Enroll(context.Background(), testConfig(t, dir), EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-1"})
	if err == nil || !strings.Contains(err.Error(), "does not name 127.0.0.1: start fleetmq with --hostname 127.0.0.1") {
		t.Fatalf("Enroll = %v, want advice about --hostname", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state folder created although the server was refused: %v", err)
	}
}

// An older server backdated every certificate 5 minutes, also before the
// start of an operator CA made moments earlier. The certificate verifies
// with its CA from the CA's start on, and the agent takes it.
func TestEnrollCertificateStartingBeforeItsCA(t *testing.T) {
	ca := newTestCAFrom(t, time.Now().Add(-time.Minute))
	f := newFakeServer(t, ca)
	f.set(func(f *fakeServer) { f.backdate = 5 * time.Minute })
	dir := t.TempDir()
	res := enrollTest(t, f, dir, "pi-1")
	id, err := loadIdentity(dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if !id.leaf.NotBefore.Before(ca.cert.NotBefore) || res.DeviceID != "pi-1" {
		t.Fatalf("test set-up: NotBefore %s not before the CA's %s, or result %+v", id.leaf.NotBefore, ca.cert.NotBefore, res)
	}
}

// A certificate that never verifies with its CA is refused; the error says
// so without a made-up "current time", and what to do now that the token
// is spent.
func TestEnrollCertificateOutsideItsCA(t *testing.T) {
	ca := newTestCAFrom(t, time.Now().Add(-time.Minute))
	f := newFakeServer(t, ca)
	f.set(func(f *fakeServer) { f.backdate, f.lifetime = 2*time.Hour, -90*time.Minute })
	dir := t.TempDir()
	_, err := Enroll(context.Background(), testConfig(t, dir), EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-1"})
	if !errors.Is(err, errNoChain) {
		t.Fatalf("Enroll = %v, want errNoChain", err)
	}
	for _, want := range []string{"never valid at the same time", "token create --device pi-1 --reprovision"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "current time") {
		t.Errorf("error %q names a current time", err)
	}
	if _, err := os.Stat(filepath.Join(dir, certFile)); !errors.Is(err, os.ErrNotExist) {
		t.Error("certificate written although refused")
	}
}

func TestEnrollServerErrors(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	dir := t.TempDir()
	bad := "fmq1." + strings.Repeat("A", 43) + "." + strings.Split(f.goodToken(), ".")[2]
	_, err := Enroll(context.Background(), testConfig(t, dir), EnrollOptions{ServerURL: f.srv.URL, Token: bad, DeviceID: "pi-1"})
	var se *ServerError
	if !errors.As(err, &se) || se.Code != "token_unknown" || se.Status != 401 {
		t.Fatalf("Enroll with unknown token = %v, want ServerError token_unknown", err)
	}
	if strings.Contains(err.Error(), strings.Repeat("A", 43)) {
		t.Error("error contains the token")
	}

	for name, opts := range map[string]EnrollOptions{
		"http url":  {ServerURL: strings.Replace(f.srv.URL, "https", "http", 1), Token: f.goodToken()},
		"bad token": {ServerURL: f.srv.URL, Token: "nope"},
		"bad id":    {ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "a/b"},
	} {
		if _, err := Enroll(context.Background(), testConfig(t, dir), opts); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestEnrollClockSkew(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	f.set(func(f *fakeServer) { f.dateOffset = time.Hour })
	bad := "fmq1." + strings.Repeat("A", 43) + "." + strings.Split(f.goodToken(), ".")[2]
	_, err := Enroll(context.Background(), testConfig(t, t.TempDir()), EnrollOptions{ServerURL: f.srv.URL, Token: bad})
	var ce *ClockError
	if !errors.As(err, &ce) || ce.Skew > -59*time.Minute || ce.Skew < -61*time.Minute {
		t.Fatalf("Enroll with a server an hour ahead = %v, want ClockError of about -1h", err)
	}
	var se *ServerError
	if !errors.As(err, &se) || se.Code != "token_unknown" {
		t.Errorf("the server's answer is lost: %v", err)
	}
	if classify(err) != failClock {
		t.Error("not classified as a clock problem")
	}
}

// A clock off by less than the certificates allow still enrolls, but the
// operator is told: every reading would carry the wrong time.
func TestEnrollWarnsOfClockSkew(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	for _, tc := range []struct {
		offset time.Duration
		warn   string
	}{
		{time.Hour, `"skew":"-1h0m0s"`},
		{time.Minute, ""},
	} {
		f.set(func(f *fakeServer) { f.dateOffset = tc.offset })
		var logs bytes.Buffer
		cfg := testConfig(t, t.TempDir())
		cfg.Logger = zerolog.New(&logs)
		check := func(op string) {
			t.Helper()
			got := strings.Count(logs.String(), "the local clock differs from the server's")
			if want := map[bool]int{true: 1}[tc.warn != ""]; got != want || !strings.Contains(logs.String(), tc.warn) {
				t.Errorf("server %v ahead: %s logs %q, want %d warning (%s)", tc.offset, op, logs.String(), want, tc.warn)
			}
			logs.Reset()
		}
		if _, err := Enroll(context.Background(), cfg, EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-1"}); err != nil {
			t.Fatalf("server %v ahead: Enroll: %v", tc.offset, err)
		}
		check("Enroll")
		if _, err := Renew(context.Background(), cfg); err != nil {
			t.Fatalf("server %v ahead: Renew: %v", tc.offset, err)
		}
		check("Renew")
	}
}

// An enrollment whose answer was lost is retried with the same key (the
// server answers a used-up token with the certificate it gave that key),
// kept 0600 in the state folder until the enrollment is committed.
func TestEnrollRetrySendsTheSameKey(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	f.set(func(f *fakeServer) { f.dropEnroll = 1 })
	dir := t.TempDir()
	once := testConfig(t, dir)
	once.EnrollAttempts = 1
	if _, err := Enroll(context.Background(), once, EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-1"}); err == nil {
		t.Fatal("Enroll succeeded although its answer was lost")
	}
	if fi, err := os.Stat(filepath.Join(dir, pendingKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("pending key after a lost answer: %v %v", fi, err)
	}
	enrollTest(t, f, dir, "pi-1")
	f.mu.Lock()
	keys := f.enrollKeys
	f.mu.Unlock()
	if len(keys) != 2 || !bytes.Equal(keys[0], keys[1]) {
		t.Fatalf("%d enroll requests, same key: %v; want 2 with the same key", len(keys), len(keys) == 2 && bytes.Equal(keys[0], keys[1]))
	}
	id, err := loadIdentity(dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if pub, _ := x509.MarshalPKIXPublicKey(id.key.Public()); !bytes.Equal(pub, keys[0]) {
		t.Error("the committed key is not the one sent")
	}
	if _, err := os.Stat(filepath.Join(dir, pendingKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pending key left after the enrollment: %v", err)
	}
}

// Enroll tries a link that drops answers again by itself, with the same
// key; a refusal is final at once.
func TestEnrollRetriesTheLinkNotRefusals(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	f.set(func(f *fakeServer) { f.dropEnroll = 2 })
	cfg := testConfig(t, t.TempDir())
	cfg.EnrollRetryBase = 10 * time.Millisecond
	var logs bytes.Buffer
	cfg.Logger = zerolog.New(&logs)
	if _, err := Enroll(context.Background(), cfg, EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-1"}); err != nil {
		t.Fatalf("Enroll over a link that dropped two answers: %v", err)
	}
	f.mu.Lock()
	keys := f.enrollKeys
	f.mu.Unlock()
	if len(keys) != 3 || !bytes.Equal(keys[0], keys[2]) {
		t.Errorf("%d requests, want 3 with one key", len(keys))
	}
	if n := strings.Count(logs.String(), "trying again"); n != 2 {
		t.Errorf("%d retries logged, want 2:\n%s", n, logs.String())
	}

	bad := "fmq1." + strings.Repeat("A", 43) + "." + strings.Split(f.goodToken(), ".")[2]
	f.mu.Lock()
	before := f.enrollReqs
	f.mu.Unlock()
	cfg.StateDir = t.TempDir()
	if _, err := Enroll(context.Background(), cfg, EnrollOptions{ServerURL: f.srv.URL, Token: bad, DeviceID: "pi-2"}); err == nil {
		t.Fatal("an unknown token enrolled")
	}
	f.mu.Lock()
	after := f.enrollReqs
	f.mu.Unlock()
	if after != before+1 {
		t.Errorf("a refusal was sent %d times, want once", after-before)
	}
}

// The kept enrollment key serves one token: another token gets a new key
// (one key is never certified as two devices), and a key others could
// read, or one that cannot be parsed, is replaced with a warning.
func TestPendingKeyKeptPerToken(t *testing.T) {
	dir := t.TempDir()
	var logs bytes.Buffer
	log := zerolog.New(&logs)
	tokA, err := parseToken(validToken(t, [32]byte{1}))
	if err != nil {
		t.Fatal(err)
	}
	tokB, _ := parseToken(validToken(t, [32]byte{1}))
	pub := func(k crypto.Signer) string {
		b, _ := x509.MarshalPKIXPublicKey(k.Public())
		return string(b)
	}
	get := func(tok bootstrapToken) string {
		t.Helper()
		k, err := pendingKey(dir, tok, log)
		if err != nil {
			t.Fatal(err)
		}
		return pub(k)
	}
	a := get(tokA)
	if get(tokA) != a {
		t.Fatal("the same token got another key")
	}
	if get(tokB) == a {
		t.Fatal("another token got the kept key")
	}
	path := filepath.Join(dir, pendingKeyFile)
	b := get(tokB)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if get(tokB) == b || !strings.Contains(logs.String(), "readable by others") {
		t.Errorf("a key others could read was used again (logs %q)", logs.String())
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("new kept key: %v %v, want mode 0600", fi, err)
	}
	raw, _ := os.ReadFile(path)
	broken := bytes.Replace(raw, []byte("\n\n"), []byte("\n\nAAAA"), 1) // header kept, key bytes spoiled
	if err := os.WriteFile(path, broken, 0o600); err != nil {
		t.Fatal(err)
	}
	logs.Reset()
	get(tokB)
	if !strings.Contains(logs.String(), "cannot be parsed") {
		t.Errorf("a spoiled key was replaced silently (logs %q)", logs.String())
	}
	if _, err := os.Stat(path + ".bad"); err != nil {
		t.Errorf("the spoiled key was not set aside: %v", err)
	}
}

func TestEnrollRefusedWhileRunningWithForce(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	dir := t.TempDir()
	enrollTest(t, f, dir, "pi-1")
	l, err := tryLock(filepath.Join(dir, runLock))
	if err != nil {
		t.Fatal(err)
	}
	defer l.unlock()
	_, err = Enroll(context.Background(), testConfig(t, dir), EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: "pi-2", Force: true})
	if !errors.Is(err, ErrAgentRunning) {
		t.Fatalf("forced enroll while running = %v, want ErrAgentRunning", err)
	}
}

// Buffered telemetry goes out under the id it was sampled as, or not at
// all: enrolling under another id drops it, also when the identity it
// replaces could not be loaded (QA: 12 readings of pi-1 published as pi-7
// after enroll --force over a garbage cert.pem).
func TestEnrollNewIDDropsOldQueue(t *testing.T) {
	garbage := func(names ...string) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			for _, n := range names {
				writeFile(t, filepath.Join(dir, n), []byte("garbage"))
			}
		}
	}
	cases := []struct {
		name    string
		breakIt func(t *testing.T, dir string)
		newID   string
		kept    int
	}{
		{"sound identity, new id", garbage(), "pi-2", 0},
		{"sound identity, same id", garbage(), "pi-1", 3},
		{"garbage cert.pem, new id", garbage(certFile), "pi-2", 0},
		{"garbage cert.pem, same id", garbage(certFile), "pi-1", 3}, // state.json names pi-1
		{"garbage key.pem, new id", garbage(keyFile), "pi-2", 0},    // cert.pem names pi-1
		{"garbage key.pem, same id", garbage(keyFile), "pi-1", 3},
		{"garbage cert.pem and state.json", garbage(certFile, stateFile), "pi-1", 0}, // whose: unknown
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFakeServer(t, newTestCA(t))
			dir := t.TempDir()
			enrollTest(t, f, dir, "pi-1")
			q := openTestQueue(t, filepath.Join(dir, queueDir), QueueOptions{})
			appendN(t, q, 0, 3)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			c.breakIt(t, dir)
			if _, err := Enroll(context.Background(), testConfig(t, dir), EnrollOptions{ServerURL: f.srv.URL, Token: f.goodToken(), DeviceID: c.newID, Force: true}); err != nil {
				t.Fatal(err)
			}
			q = openTestQueue(t, filepath.Join(dir, queueDir), QueueOptions{})
			if p, _, _ := q.Stats(); p != c.kept {
				t.Errorf("%d messages kept, want %d", p, c.kept)
			}
		})
	}
}

func TestRenew(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	dir := t.TempDir()
	enrollTest(t, f, dir, "pi-1")
	before, _ := loadIdentity(dir, zerolog.Nop())
	keyBefore, _ := os.ReadFile(filepath.Join(dir, keyFile))

	res, err := Renew(context.Background(), testConfig(t, dir))
	if err != nil {
		t.Fatalf("Renew: %v", err)
	}
	after, _ := loadIdentity(dir, zerolog.Nop())
	keyAfter, _ := os.ReadFile(filepath.Join(dir, keyFile))
	if after.serial() == before.serial() || bytes.Equal(keyBefore, keyAfter) {
		t.Error("renewal kept the certificate or the key")
	}
	if res.DeviceID != "pi-1" || !res.NotAfter.Equal(after.leaf.NotAfter) {
		t.Errorf("result %+v", res)
	}
	if mtls, proof := f.counts(); mtls != 1 || proof != 0 {
		t.Errorf("renewals mtls=%d proof=%d, want 1, 0", mtls, proof)
	}
	st, _ := readState(dir)
	if st.LastRenewal.IsZero() || !st.NotAfter.Equal(after.leaf.NotAfter) {
		t.Errorf("state after renewal %+v", st)
	}
}

func TestRenewAfterExpiry(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	dir := t.TempDir()
	enrollTest(t, f, dir, "pi-1")
	before, _ := loadIdentity(dir, zerolog.Nop())
	// The agent believes the certificate expired a day ago: it must use
	// the signed proof, not mTLS.
	cfg := testConfig(t, dir)
	cfg.Now = func() time.Time { return before.leaf.NotAfter.Add(24 * time.Hour) }
	if _, err := Renew(context.Background(), cfg); err != nil {
		t.Fatalf("Renew after expiry: %v", err)
	}
	if mtls, proof := f.counts(); mtls != 0 || proof != 1 {
		t.Errorf("renewals mtls=%d proof=%d, want 0, 1", mtls, proof)
	}
	after, _ := loadIdentity(dir, zerolog.Nop())
	if after.serial() == before.serial() {
		t.Error("certificate not replaced")
	}
}

func TestRenewFailuresKeepKeyMaterial(t *testing.T) {
	cases := []struct {
		name   string
		setup  func(f *fakeServer)
		now    func(notAfter time.Time) time.Time
		want   failure
		advice string
	}{
		{"revoked", func(f *fakeServer) { f.revoked["pi-1"] = true }, nil, failRevoked, "enroll under a new id"},
		// cert_revoked: the certificate, not the device; the id lives on.
		{"superseded", func(f *fakeServer) { f.superseded = true }, nil, failSuperseded, "token create --device ID --reprovision"},
		// Issued already expired, so the local clock and the server agree
		// that it is; the server says the grace is over.
		{"beyond grace", func(f *fakeServer) { f.expiredAns = true }, nil, failNeedsToken, "--reprovision"},
		{"unknown to the server", func(f *fakeServer) { f.forgotten = true }, nil, failCertUnknown, "restored from a backup older than this device"},
		{"clock skew", func(f *fakeServer) { f.revoked["pi-1"] = true; f.dateOffset = -time.Hour }, nil, failClock, "clock"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFakeServer(t, newTestCA(t))
			dir := t.TempDir()
			if c.name == "beyond grace" {
				f.set(func(f *fakeServer) { f.lifetime = -30 * time.Second })
			}
			enrollTest(t, f, dir, "pi-1")
			before, _ := loadIdentity(dir, zerolog.Nop())
			keyBefore, _ := os.ReadFile(filepath.Join(dir, keyFile))
			f.set(c.setup)
			cfg := testConfig(t, dir)
			if c.now != nil {
				cfg.Now = func() time.Time { return c.now(before.leaf.NotAfter) }
			}
			_, err := Renew(context.Background(), cfg)
			if err == nil {
				t.Fatal("no error")
			}
			if got := classify(err); got != c.want {
				t.Errorf("classify(%v) = %v, want %v", err, got, c.want)
			}
			if !strings.Contains(err.Error(), c.advice) {
				t.Errorf("error %q lacks %q", err, c.advice)
			}
			keyAfter, _ := os.ReadFile(filepath.Join(dir, keyFile))
			after, err := loadIdentity(dir, zerolog.Nop())
			if err != nil || after.serial() != before.serial() || !bytes.Equal(keyBefore, keyAfter) {
				t.Error("a failed renewal changed the key material")
			}
		})
	}
}

func TestRenewAdoptsRenewalByAnotherProcess(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	dir := t.TempDir()
	enrollTest(t, f, dir, "pi-1")
	stale, _ := loadIdentity(dir, zerolog.Nop())
	if _, err := Renew(context.Background(), testConfig(t, dir)); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, dir).withDefaults()
	got, err := renewAndCommit(context.Background(), cfg, &stateStore{dir: dir}, stale)
	if err != nil {
		t.Fatal(err)
	}
	if mtls, _ := f.counts(); mtls != 1 {
		t.Errorf("%d renewals, want 1: the newer certificate on disk should have been adopted", mtls)
	}
	if got.serial() == stale.serial() {
		t.Error("stale identity returned")
	}
}

func TestEnrollAdvice(t *testing.T) {
	wrap := func(code string) error {
		return fmt.Errorf("post: %w", &ServerError{Status: 400, Code: code, Message: "m"})
	}
	cases := []struct {
		err    error
		id     string
		advice string // "" for none
	}{
		{wrap(codeIDInvalid), "", "name the device with --id"},
		{wrap(codeIDInvalid), "Bad/Id", ""},
		{wrap(codeIDTaken), "pi-1", "--reprovision"},
		{&ServerError{Status: 409, Code: codeIDTaken, Message: "device id already taken: it was revoked, and revoked ids are never used again"}, "pi-1", "under another id (--id)"},
		{&ServerError{Status: 409, Code: codeIDHasToken, Message: "device id pi-7 is reserved"}, "pi-7", "another id with --id; if this is the device that token was minted for, enroll it with that token"},
		{wrap(codeTokenUsed), "", "the token enrolled another key"},
		{wrap(codeTokenUnknown), "", "check the token was pasted whole"},
		{wrap(codeTokenExpired), "", "ask the operator for a new token"},
		{wrap(codeTokenRevoked), "pi-1", "ask the operator for a new token"},
		{&ServerError{Status: 403, Code: codeIDMismatch, Message: "token is bound to another device id: pi-x1"}, "pi-other", "leave out --id to enroll under the id the token is bound to, or ask the operator for a token for pi-other"},
		{wrap(codeIDMismatch), "", ""},
		{errors.New("dial: refused"), "", ""},
	}
	for _, c := range cases {
		got := enrollAdvice(c.err, c.id)
		if !errors.Is(got, c.err) {
			t.Errorf("%v: the cause is lost: %v", c.err, got)
		}
		if c.advice == "" {
			if got != c.err {
				t.Errorf("%v (id %q): advice added: %v", c.err, c.id, got)
			}
			continue
		}
		var se *ServerError
		if !strings.Contains(got.Error(), c.advice) || !errors.As(got, &se) {
			t.Errorf("%v (id %q) = %v, want %q and the server error kept", c.err, c.id, got, c.advice)
		}
	}
}
