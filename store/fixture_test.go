package store_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// The files under testdata/store at the module root are a store written by
// schema 1, the first layout, and what it holds as the API reads it. They are
// kept as they were written: every later fleetmq must open that file and read
// the same fleet from it, so that an upgrade never strands a data folder. A
// schema change adds a pair of its own and keeps this one; rewriting it with
// newer code would test nothing.
var writeFixture = flag.Bool("write-schema-fixture", false,
	"write testdata/store/schema1.{db,json} at the module root (only while the schema is 1, and only to create them)")

var fixtureDir = filepath.Join("..", "testdata", "store")

// fixtureTime is when the fixture's fleet was made up; its certificates are
// long expired, which the API must not mind when reading.
var fixtureTime = time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)

// fixtureFleet is how the test sees a store: everything the fleet API
// returns, with secrets and certificates reduced to their digests.
type fixtureFleet struct {
	Devices   []store.Device
	Tokens    []fixtureToken
	Certs     []fixtureCert // every certificate an audit event names
	Revoked   []string      // serials on the CRL
	Audit     []store.AuditEvent
	Telemetry map[string][]fixtureMessage
	Presence  map[string]store.Presence
}

type fixtureToken struct {
	store.Token
	HashHex string
}

type fixtureCert struct {
	store.Cert
	DERSHA256 string
	CN        string
}

type fixtureMessage struct {
	store.Message
	PayloadHex string
}

func TestSchema1FixtureReads(t *testing.T) {
	if *writeFixture {
		writeSchema1Fixture(t)
	}
	want, err := os.ReadFile(filepath.Join(fixtureDir, "schema1.json"))
	if err != nil {
		t.Fatal(err)
	}
	// Open writes (it records missing buckets, later schemas migrate):
	// never on the checked-in file.
	orig, err := os.ReadFile(filepath.Join(fixtureDir, "schema1.db"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "fleet.db")
	if err := os.WriteFile(path, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	db := store.OpenTestPath(t, path, store.Options{})
	got := dumpFleet(t, db)
	if !bytes.Equal(bytes.TrimSpace(got), bytes.TrimSpace(want)) {
		t.Errorf("the schema 1 store reads differently now:\n got: %s\nwant: %s", got, want)
	}
	// It was written before the CRL index, which opening it builds.
	if revs := checkRevocations(t, db); len(revs) != 1 {
		t.Errorf("revocations of the schema 1 store: %+v, want its one revoked certificate", revs)
	}

	// The fleet goes on from where it was: the CA binding holds, the
	// used token stays spent, and new writes land next to the old ones.
	ctx := context.Background()
	if err := db.BindCA(ctx, "fixture-ca"); err != nil {
		t.Errorf("bind the fixture's CA again: %v", err)
	}
	if err := db.BindCA(ctx, "another-ca"); !errors.Is(err, store.ErrCAMismatch) {
		t.Errorf("bind another CA: %v, want ErrCAMismatch", err)
	}
	err = db.Enroll(ctx, store.Enrollment{TokenHash: sha256.Sum256([]byte("fixture-token-used")),
		Device: store.Device{ID: "pi-0003"}, Cert: store.Cert{Serial: "f1", NotAfter: fixtureTime.Add(time.Hour)}, Now: fixtureTime})
	if !errors.Is(err, store.ErrTokenUsed) {
		t.Errorf("enroll with the spent token: %v, want ErrTokenUsed", err)
	}
	now := time.Now().UTC()
	err = db.Enroll(ctx, store.Enrollment{TokenHash: sha256.Sum256([]byte("fixture-token-free")),
		Device: store.Device{ID: "pi-0003"}, Cert: store.Cert{Serial: "f1", NotAfter: now.Add(time.Hour)}, Now: now})
	if err != nil {
		t.Errorf("enroll with the free token: %v", err)
	}
	if err := db.AppendTelemetry(ctx, []store.Message{{DeviceID: "pi-0001", Topic: "devices/pi-0001/telemetry", Received: now, QoS: 1, Payload: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	msgs, err := db.Telemetry(ctx, "pi-0001", time.Time{}, 0)
	if err != nil || len(msgs) != 4 {
		t.Errorf("pi-0001 telemetry after a new message: %d messages, %v; want 4", len(msgs), err)
	}
	if _, err := db.PruneTelemetry(ctx, time.Time{}, 2); err != nil {
		t.Fatal(err)
	}
	msgs, err = db.Telemetry(ctx, "pi-0001", time.Time{}, 0)
	if err != nil || len(msgs) != 2 || !msgs[1].Received.Equal(now) {
		t.Errorf("pi-0001 telemetry after a count cap of 2: %+v, %v; want the 2 newest", msgs, err)
	}
}

// dumpFleet reads everything the fleet API exposes, as indented JSON.
func dumpFleet(t *testing.T, db *store.DB) []byte {
	t.Helper()
	ctx := context.Background()
	var f fixtureFleet
	var err error
	if f.Devices, err = db.Devices(ctx); err != nil {
		t.Fatal(err)
	}
	toks, err := db.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range toks {
		byHash, err := db.TokenByHash(ctx, tok.Hash)
		if err != nil || byHash.ID != tok.ID {
			t.Errorf("token %s by its hash: %+v, %v", tok.ID, byHash, err)
		}
		f.Tokens = append(f.Tokens, fixtureToken{Token: tok, HashHex: hex.EncodeToString(tok.Hash[:])})
	}
	if f.Audit, err = db.Audit(ctx, store.AuditFilter{Limit: 1000}); err != nil {
		t.Fatal(err)
	}
	seen := make(map[string]bool)
	for _, ev := range f.Audit {
		if ev.Serial == "" || seen[ev.Serial] {
			continue
		}
		seen[ev.Serial] = true
		c, err := db.Cert(ctx, ev.Serial)
		if err != nil {
			t.Fatalf("certificate %s of audit event %d: %v", ev.Serial, ev.Seq, err)
		}
		x, err := x509.ParseCertificate(c.DER)
		if err != nil {
			t.Fatalf("certificate %s: %v", c.Serial, err)
		}
		sum := sha256.Sum256(c.DER)
		f.Certs = append(f.Certs, fixtureCert{Cert: c, DERSHA256: hex.EncodeToString(sum[:]), CN: x.Subject.CommonName})
	}
	revoked, err := db.RevokedCerts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range revoked {
		f.Revoked = append(f.Revoked, c.Serial)
	}
	f.Telemetry = make(map[string][]fixtureMessage)
	for _, d := range f.Devices {
		msgs, err := db.Telemetry(ctx, d.ID, time.Time{}, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			f.Telemetry[d.ID] = append(f.Telemetry[d.ID], fixtureMessage{Message: m, PayloadHex: hex.EncodeToString(m.Payload)})
		}
	}
	if f.Presence, err = db.Presences(ctx); err != nil {
		t.Fatal(err)
	}
	out, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// writeSchema1Fixture makes up a small fleet through the API — a device
// enrolled, renewed and publishing, one revoked, a service, spent, free and
// revoked tokens, presence — and writes the file and its dump.
func writeSchema1Fixture(t *testing.T) {
	if store.SchemaVersion != 1 {
		t.Fatalf("the schema is %d: add a fixture of its own instead of rewriting schema 1's", store.SchemaVersion)
	}
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	at := func(minutes int) time.Time { return fixtureTime.Add(time.Duration(minutes) * time.Minute) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(db.BindCA(ctx, "fixture-ca"))
	token := func(secret, device string, uses int, expires time.Time) store.Token {
		h := sha256.Sum256([]byte(secret))
		return store.Token{ID: hex.EncodeToString(h[:6]), Hash: h, DeviceID: device, MaxUses: uses,
			Labels: map[string]string{"site": "lab"}, CreatedAt: at(0), ExpiresAt: expires}
	}
	must(db.CreateTokens(ctx, []store.Token{
		token("fixture-token-used", "pi-0001", 1, at(24*60)),
		token("fixture-token-other", "pi-0002", 1, at(24*60)),
		token("fixture-token-revoked", "", 5, at(24*60)),
		// Free for a test to spend: it never expires in any test's lifetime.
		token("fixture-token-free", "", 1, time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)),
	}, "192.0.2.1", at(0)))
	_, err = db.RevokeToken(ctx, token("fixture-token-revoked", "", 5, at(0)).ID, "192.0.2.1", at(1))
	must(err)

	ca, caKey := fixtureCA(t)
	issue := func(cn string, serial int64, from time.Time) store.Cert {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(err)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: from, NotAfter: from.Add(30 * 24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		must(err)
		return store.Cert{Serial: fmt.Sprintf("%x", serial), DeviceID: cn, NotBefore: from, NotAfter: tmpl.NotAfter, IssuedAt: from, DER: der}
	}
	must(db.Enroll(ctx, store.Enrollment{TokenHash: sha256.Sum256([]byte("fixture-token-used")),
		Device: store.Device{ID: "pi-0001", Labels: map[string]string{"site": "lab"}}, Cert: issue("pi-0001", 0x1001, at(10)), Remote: "192.0.2.10", Now: at(10)}))
	must(db.Enroll(ctx, store.Enrollment{TokenHash: sha256.Sum256([]byte("fixture-token-other")),
		Device: store.Device{ID: "pi-0002"}, Cert: issue("pi-0002", 0x1002, at(11)), Remote: "192.0.2.11", Now: at(11)}))
	must(db.Renew(ctx, store.Renewal{DeviceID: "pi-0001", OldSerial: "1001", Cert: issue("pi-0001", 0x1003, at(60)), Remote: "192.0.2.10", Now: at(60)}))
	must(db.CreateIdentity(ctx, store.Device{ID: "backend", Role: store.RoleService}, issue("backend", 0x1004, at(12)), "", at(12)))
	_, err = db.RevokeDevice(ctx, "pi-0002", "", at(90))
	must(err)

	must(db.AppendTelemetry(ctx, []store.Message{
		{DeviceID: "pi-0001", Topic: "devices/pi-0001/telemetry", Received: at(20), QoS: 1, Payload: []byte(`{"load1":0.25,"mem_available":123456}`)},
		{DeviceID: "pi-0001", Topic: "devices/pi-0001/telemetry/gps", Received: at(21), QoS: 0, Payload: []byte{0x00, 0xff, 0x10}},
		{DeviceID: "pi-0001", Topic: "devices/pi-0001/telemetry", Received: at(21), QoS: 1, Payload: nil},
		{DeviceID: "pi-0002", Topic: "devices/pi-0002/telemetry", Received: at(22), QoS: 1, Payload: []byte(`text, not JSON`)},
	}))
	must(db.SetPresence(ctx,
		store.Presence{DeviceID: "pi-0001", Online: true, LastSeen: at(61), Node: "node-a"},
		store.Presence{DeviceID: "pi-0002", Online: false, LastSeen: at(89), Node: "node-a"}))
	must(db.Close())

	raw, err := os.ReadFile(path)
	must(err)
	must(os.MkdirAll(fixtureDir, 0o755))
	must(os.WriteFile(filepath.Join(fixtureDir, "schema1.db"), raw, 0o644))

	db, err = store.Open(path, store.Options{})
	must(err)
	dump := dumpFleet(t, db)
	must(db.Close())
	must(os.WriteFile(filepath.Join(fixtureDir, "schema1.json"), append(dump, '\n'), 0o644))
}

// fixtureCA is a CA made for the fixture and forgotten: the stored
// certificates only have to parse.
func fixtureCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fixture CA"},
		NotBefore: fixtureTime.Add(-time.Hour), NotAfter: fixtureTime.Add(365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return ca, key
}
