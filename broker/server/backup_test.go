package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/cli"
	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// TestBackupRestore: `fleetmq backup DIR` taken while a device is connected
// and publishing is a data folder that a new node serves as it was at the
// backup: same CA, the device reconnects with its certificate, the
// telemetry stored before the backup is there and what came after is not.
func TestBackupRestore(t *testing.T) {
	s := startServer(t)
	d := s.enroll(t, s.token(t), "pi-b1")
	c := pahoClient(t, s, d, "pi-b1", nil)
	send := func(from, to int) {
		for i := from; i < to; i++ {
			tok := c.Publish("devices/pi-b1/telemetry", 1, false, fmt.Sprintf(`{"n":%d}`, i))
			if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Fatalf("publish %d: %v", i, tok.Error())
			}
		}
	}
	send(0, 20)

	// A folder that is not empty is refused, and left as it was.
	full := t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "notes.txt"), []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, errs, code := s.cli(t, "backup", full); code != 2 || !strings.Contains(errs, "not empty") {
		t.Fatalf("backup into a non-empty folder: exit %d: %s", code, errs)
	}
	if entries, _ := os.ReadDir(full); len(entries) != 1 {
		t.Fatalf("a refused backup wrote into the folder: %v", entries)
	}

	// A folder holding only what a killed backup left is taken.
	dir := filepath.Join(t.TempDir(), "backup")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, server.DBName+".partial"), []byte("torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errs, code := s.cli(t, "backup", dir)
	if code != 0 || !strings.Contains(out, "backup of 1 identity") || !strings.Contains(out, "--data "+dir) {
		t.Fatalf("backup: exit %d\n%s%s", code, out, errs)
	}
	for name, mode := range map[string]os.FileMode{".": 0o700 | os.ModeDir, server.DBName: 0o600, "ca.key": 0o600, "ca.pem": 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode() != mode {
			t.Errorf("%s: %v, %v; want mode %v", name, fi.Mode(), err, mode)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 3 {
		t.Errorf("backup folder holds %d files, want 3: %v", len(entries), entries)
	}
	out, _, _ = s.cli(t, "audit", "--json")
	var evs []store.AuditEvent
	if err := json.Unmarshal([]byte(out), &evs); err != nil || evs[len(evs)-1].Action != store.ActBackup {
		t.Fatalf("no %s audit event: %v\n%s", store.ActBackup, err, out)
	}

	send(20, 30) // after the backup: not in it
	c.Disconnect(100)
	fp := s.CA().Fingerprint()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	r := startServer(t, func(c *server.Config) { c.DataDir = dir })
	if r.CA().Fingerprint() != fp {
		t.Fatal("the restored node has another CA")
	}
	r.wantNumbered(t, "pi-b1", 20) // not the 10 sent after the backup
	pahoClient(t, r, d, "pi-b1", nil).Disconnect(100)
}

// renewOver renews d's certificate over mTLS with a new key.
func (s *testServer) renewOver(tb testing.TB, d *device) (*device, answer) {
	tb.Helper()
	key := newKey(tb)
	a := s.post(tb, s.client(d.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(tb, key, ""))
	if a.status != http.StatusOK {
		return nil, a
	}
	return &device{key: key, cert: parseCert(tb, a.resp.Certificate)}, a
}

// TestRestoreTakesBackRenewedDevices: a device that renewed after the
// backup presents a certificate the restored node has no record of. The
// broker refuses it like any unknown certificate; a renewal with it is
// taken back (cert.adopt) and the new certificate connects. Certificates
// the CA issued outside the lost span — before the snapshot, after the
// restore — stay refused, as does a device enrolled after the backup.
//
// The node's clock is the test's: certificates carry whole seconds, so the
// steps are minutes apart; less than the 5 minutes certificates are
// backdated, so that they stay valid for the real clock of the clients.
func TestRestoreTakesBackRenewedDevices(t *testing.T) {
	s := startServer(t)
	a := s.enroll(t, s.token(t), "pi-a")
	strayKey := newKey(t)
	before, err := s.CA().IssueDevice(strayKey.Public(), "pi-a", time.Hour) // never recorded
	if err != nil {
		t.Fatal(err)
	}
	s.clock.Advance(2 * time.Minute)
	dir := filepath.Join(t.TempDir(), "backup")
	if _, errs, code := s.cli(t, "backup", dir); code != 0 {
		t.Fatalf("backup: %s", errs)
	}
	a2, ans := s.renewOver(t, a)
	if a2 == nil {
		t.Fatalf("renew after the backup: %d %s", ans.status, ans.body)
	}
	late := s.enroll(t, s.token(t), "pi-late")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	r := startServer(t, func(c *server.Config) { c.DataDir, c.Now = dir, s.clock.Now })
	if err := r.handshake(a2); err == nil {
		t.Fatal("the broker took a certificate it has no record of")
	}
	a3, ans := r.renewOver(t, a2)
	if a3 == nil {
		t.Fatalf("renewal with the certificate renewed after the backup: %d %s", ans.status, ans.body)
	}
	pahoClient(t, r, a3, "pi-a", nil).Disconnect(100)
	out, _, _ := r.cli(t, "audit", "--device", "pi-a", "--json")
	var evs []store.AuditEvent
	if err := json.Unmarshal([]byte(out), &evs); err != nil || len(evs) < 2 ||
		evs[len(evs)-2].Action != store.ActCertAdopt || evs[len(evs)-2].Serial != enroll.SerialHex(a2.cert.SerialNumber) {
		t.Fatalf("audit: %v\n%s", err, out)
	}

	s.clock.Advance(2 * time.Minute)
	after, err := r.CA().IssueDevice(strayKey.Public(), "pi-a", time.Hour) // after the restore, never recorded
	if err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]*device{
		"issued before the snapshot":       {key: strayKey, cert: before},
		"issued after the restore":         {key: strayKey, cert: after},
		"device enrolled after the backup": late,
	} {
		if got, ans := r.renewOver(t, d); got != nil || ans.status != http.StatusUnauthorized || ans.code != "cert_invalid" {
			t.Errorf("%s: %d %s, want 401 cert_invalid", name, ans.status, ans.body)
		}
	}
}

// With an operator-provided CA the backup says the CA is not in it, even
// when the data folder still holds a CA generated before --ca-cert was
// given: restoring that one would sign with the wrong CA.
func TestBackupWithOperatorCA(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if _, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: data}); err != nil { // the stale one
		t.Fatal(err)
	}
	own := t.TempDir()
	if _, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: own}); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, func(c *server.Config) {
		c.DataDir = data
		c.CACertFile, c.CAKeyFile = filepath.Join(own, "ca.pem"), filepath.Join(own, "ca.key")
	})
	dir := filepath.Join(t.TempDir(), "backup")
	out, errs, code := s.cli(t, "backup", "--json", dir)
	var res cli.BackupResult
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil {
		t.Fatalf("backup: exit %d\n%s%s", code, out, errs)
	}
	if res.CAIncluded || res.Dir != dir || res.Bytes <= 0 {
		t.Fatalf("backup result %+v", res)
	}
	if fi, err := os.Stat(filepath.Join(dir, server.DBName)); err != nil || fi.Size() != res.Bytes {
		t.Fatalf("backup says %d bytes, the file kept: %v %v", res.Bytes, fi.Size(), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.key")); err == nil {
		t.Fatal("the stale generated CA was copied into the backup")
	}
	out, _, _ = s.cli(t, "backup", filepath.Join(t.TempDir(), "again"))
	if !strings.Contains(out, "the CA is not in the data folder") {
		t.Fatalf("no word about the CA:\n%s", out)
	}
}

// TestCAMustMatchTheFleet: a database whose certificates one CA issued is
// never served with another — not a CA generated because the operator CA
// was not given again (restoring a backup of a server that ran with
// --ca-cert), not another operator CA. The server refuses to start and
// says what to give it; nothing is generated.
func TestCAMustMatchTheFleet(t *testing.T) {
	own := t.TempDir()
	if _, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: own}); err != nil {
		t.Fatal(err)
	}
	withOwn := func(c *server.Config) {
		c.CACertFile, c.CAKeyFile = filepath.Join(own, "ca.pem"), filepath.Join(own, "ca.key")
	}
	s := startServer(t, withOwn)
	s.enroll(t, s.token(t), "pi-ca")
	cfg := s.cfg
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	cfg.EnrollAddr, cfg.MQTTAddr = "127.0.0.1:0", "127.0.0.1:0"
	noCA := cfg
	noCA.CACertFile, noCA.CAKeyFile = "", ""
	if srv, err := server.New(noCA); err == nil {
		srv.Close()
		t.Fatal("served a fleet with a newly generated CA")
	} else if !errors.Is(err, enroll.ErrNoCA) || !strings.Contains(err.Error(), "--ca-cert") {
		t.Fatalf("error %q does not say to give the CA", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "ca.pem")); err == nil {
		t.Fatal("a CA was generated in the data folder")
	}

	other := t.TempDir()
	if _, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: other}); err != nil {
		t.Fatal(err)
	}
	wrong := cfg
	wrong.CACertFile, wrong.CAKeyFile = filepath.Join(other, "ca.pem"), filepath.Join(other, "ca.key")
	if srv, err := server.New(wrong); err == nil {
		srv.Close()
		t.Fatal("served the fleet with another CA")
	} else if !errors.Is(err, store.ErrCAMismatch) {
		t.Fatalf("error %q is not about the CA", err)
	}

	srv, err := server.New(cfg) // the right one
	if err != nil {
		t.Fatalf("with its own CA: %v", err)
	}
	srv.Close()
}

// failingWriter takes n bytes, then fails as a full disk does.
type failingWriter struct{ n int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		k := w.n
		w.n = 0
		return k, syscall.ENOSPC
	}
	w.n -= len(p)
	return len(p), nil
}

// TestBackupWriteFailure: a backup whose local copy cannot be written
// says so (not "stream cut short"), and the server audits the part of the
// database that left it.
func TestBackupWriteFailure(t *testing.T) {
	s := startServer(t)
	// A database larger than the socket's buffers: the server is still
	// sending when the copy fails.
	if _, errs, code := s.cli(t, "token", "create", "--count", "10000", "--prefix", "big-", "--json"); code != 0 {
		t.Fatalf("token create: %s", errs)
	}
	_, _, err := admin.NewClient(s.AdminSocket()).Backup(context.Background(), &failingWriter{n: 4096})
	if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "writing the copy") {
		t.Fatalf("backup into a full disk: %v", err)
	}
	var last store.AuditEvent
	eventually(t, func() bool {
		out, _, _ := s.cli(t, "audit", "--json")
		var evs []store.AuditEvent
		if json.Unmarshal([]byte(out), &evs) != nil || len(evs) == 0 {
			return false
		}
		last = evs[len(evs)-1]
		return last.Action == store.ActBackup
	}, "the cut-short backup audited")
	if !strings.HasPrefix(last.Detail, "cut short after") {
		t.Errorf("audit detail %q, want cut short", last.Detail)
	}
}
