package server_test

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// TestIdentityRenew: a service or an operator outlives its certificate,
// and its name is for life, so the CLI renews it under the same name. The
// old certificate keeps working until it expires, so that the new pair can
// be deployed first.
func TestIdentityRenew(t *testing.T) {
	s := startServer(t)
	s.enroll(t, s.token(t), "pi-r1")
	connect := func(dir, name string) error {
		t.Helper()
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key"))
		if err != nil {
			t.Fatal(err)
		}
		c := paho.NewClient(paho.NewClientOptions().
			AddBroker("tls://" + s.MQTTAddr().String()).SetClientID(name).SetProtocolVersion(4).
			SetAutoReconnect(false).SetConnectRetry(false).
			SetTLSConfig(&tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}}))
		tok := c.Connect()
		if !tok.WaitTimeout(15 * time.Second) {
			t.Fatalf("connect %s: no answer", name)
		}
		if tok.Error() == nil {
			c.Disconnect(100)
		}
		return tok.Error()
	}

	first, second := t.TempDir(), t.TempDir()
	if _, errs, code := s.cli(t, "service", "issue", "backend", "--out", first); code != 0 {
		t.Fatalf("service issue: %s", errs)
	}
	oldSerial := s.deviceInfo(t, "backend").Serial

	// Without --renew the name is taken, and the message says what to do.
	if _, errs, code := s.cli(t, "service", "issue", "backend", "--out", second); code == 0 || !strings.Contains(errs, "service issue backend --renew") {
		t.Errorf("issue of a taken name: exit %d: %s", code, errs)
	}
	// The files in use are never overwritten.
	if _, errs, code := s.cli(t, "service", "issue", "backend", "--renew", "--out", first); code == 0 || !strings.Contains(errs, "--out DIR") {
		t.Errorf("renew into the folder in use: exit %d: %s", code, errs)
	}
	if s.deviceInfo(t, "backend").Serial != oldSerial {
		t.Fatal("a refused renewal changed the certificate")
	}

	out, errs, code := s.cli(t, "service", "issue", "backend", "--renew", "--out", second)
	if code != 0 || !strings.Contains(out, "service backend renewed until") {
		t.Fatalf("renew: exit %d: %s%s", code, out, errs)
	}
	info := s.deviceInfo(t, "backend")
	pemBytes, err := os.ReadFile(filepath.Join(second, "backend.pem"))
	if err != nil {
		t.Fatal(err)
	}
	newLeaf := parseCert(t, string(pemBytes))
	if !info.NotAfter.Equal(newLeaf.NotAfter) {
		t.Errorf("expiry %v after renewal, want the new certificate's %v", info.NotAfter, newLeaf.NotAfter)
	}
	if info.Serial == oldSerial || info.Serial != newLeaf.SerialNumber.Text(16) {
		t.Errorf("serial %s after renewal, want the new certificate's %s (old %s)", info.Serial, newLeaf.SerialNumber.Text(16), oldSerial)
	}
	for _, dir := range []string{first, second} {
		if err := connect(dir, "backend"); err != nil {
			t.Errorf("connect with the certificate in %s: %v", dir, err)
		}
	}
	audit, _, _ := s.cli(t, "audit", "--device", "backend")
	if !strings.Contains(audit, "cert.renew") || !strings.Contains(audit, "from "+oldSerial) {
		t.Errorf("audit:\n%s", audit)
	}

	// Operators renew the same way; the role must match, devices renew
	// themselves, and an unknown name is not created by --renew.
	if _, errs, code := s.cli(t, "operator", "issue", "ops", "--out", t.TempDir()); code != 0 {
		t.Fatalf("operator issue: %s", errs)
	}
	if out, errs, code := s.cli(t, "operator", "issue", "ops", "--renew", "--out", t.TempDir()); code != 0 || !strings.Contains(out, "operator ops renewed") {
		t.Errorf("operator renew: exit %d: %s%s", code, out, errs)
	}
	if _, errs, code := s.cli(t, "service", "issue", "gone", "--out", t.TempDir()); code != 0 {
		t.Fatalf("service issue: %s", errs)
	}
	if _, errs, code := s.cli(t, "device", "revoke", "gone"); code != 0 {
		t.Fatalf("revoke: %s", errs)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"operator", "issue", "backend", "--renew"}, "backend has the role service, not operator"},
		{[]string{"service", "issue", "pi-r1", "--renew"}, "devices renew their own certificates"},
		{[]string{"service", "issue", "ghost", "--renew"}, `no service "ghost" to renew`},
		// A name taken by another role: renewing it would be refused too.
		{[]string{"service", "issue", "pi-r1"}, "the name pi-r1 is taken by a device; names are for life: choose another"},
		{[]string{"service", "issue", "ops"}, "the name ops is taken by an operator; names are for life: choose another"},
		{[]string{"service", "issue", "gone"}, "the name gone was revoked; revoked names are never used again: choose another"},
	} {
		dir := t.TempDir()
		if _, errs, code := s.cli(t, append(tc.args, "--out", dir)...); code == 0 || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d: %s, want %q", tc.args, code, errs, tc.want)
		}
		if keys, _ := filepath.Glob(filepath.Join(dir, "*.key")); len(keys) != 0 {
			t.Errorf("%v: key left behind: %v", tc.args, keys)
		}
	}

	// A refusal leaves no folder it made behind; the name ca would have its
	// certificate overwritten by the CA's ca.pem, and is refused.
	fresh := filepath.Join(t.TempDir(), "new")
	if _, _, code := s.cli(t, "service", "issue", "ghost", "--renew", "--out", fresh); code == 0 {
		t.Error("renew of an unknown name succeeded")
	}
	if _, err := os.Stat(fresh); !os.IsNotExist(err) {
		t.Errorf("a refused issue left its --out folder: %v", err)
	}
	if _, errs, code := s.cli(t, "service", "issue", "ca", "--out", t.TempDir()); code != 2 || !strings.Contains(errs, "the name ca is where the CA goes") {
		t.Errorf("service issue ca: exit %d: %s", code, errs)
	}

	// A revoked name stays revoked: no new certificate for it.
	if _, errs, code := s.cli(t, "device", "revoke", "backend"); code != 0 {
		t.Fatal(errs)
	}
	if _, errs, code := s.cli(t, "service", "issue", "backend", "--renew", "--out", t.TempDir()); code == 0 || !strings.Contains(errs, "revoked") {
		t.Errorf("renew of a revoked service: exit %d: %s", code, errs)
	}
	for _, dir := range []string{first, second} {
		if err := connect(dir, "backend"); err == nil {
			t.Errorf("a certificate of the revoked service in %s still connects", dir)
		}
	}
}
