package server_test

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetmq/fleetmq/store"
	"github.com/fleetmq/fleetmq/store/storetest"
)

// A list revoked in one command is revoked as each alone would be: live
// sessions closed within a second, retained status emptied for its
// subscribers, every certificate on the CRL, one audit event per device.
func TestRevokeManyThroughCLI(t *testing.T) {
	s := startServer(t)
	ids := []string{"pi-m1", "pi-m2", "pi-m3", "pi-m4"}
	devs := map[string]*device{}
	for _, id := range append(ids, "pi-keep") {
		devs[id] = s.enroll(t, s.token(t), id)
	}

	// A backend watching statuses, and two of the devices online with
	// their status retained.
	dir := t.TempDir()
	if _, errs, code := s.cli(t, "service", "issue", "watcher", "--out", dir); code != 0 {
		t.Fatalf("service issue: %s", errs)
	}
	wcert, err := tls.LoadX509KeyPair(filepath.Join(dir, "watcher.pem"), filepath.Join(dir, "watcher.key"))
	if err != nil {
		t.Fatal(err)
	}
	statuses := make(chan paho.Message, 16)
	watcher := paho.NewClient(paho.NewClientOptions().
		AddBroker("tls://" + s.MQTTAddr().String()).SetClientID("watcher").SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).
		SetTLSConfig(&tls.Config{RootCAs: s.CA().Pool(), Certificates: []tls.Certificate{wcert}}))
	if tok := watcher.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("watcher connect: %v", tok.Error())
	}
	defer watcher.Disconnect(0)
	var lost []chan error
	for _, id := range ids[:2] {
		ch := make(chan error, 1)
		c := pahoClient(t, s, devs[id], id, ch)
		defer c.Disconnect(0)
		if tok := c.Publish("devices/"+id+"/status", 1, true, `{"state":"online"}`); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("%s status: %v", id, tok.Error())
		}
		lost = append(lost, ch)
	}
	sub := watcher.Subscribe("devices/+/status", 1, func(_ paho.Client, m paho.Message) { statuses <- m })
	if !sub.WaitTimeout(10*time.Second) || sub.Error() != nil {
		t.Fatalf("subscribe: %v", sub.Error())
	}
	retained := map[string]bool{}
	for len(retained) < 2 {
		m := nextStatus(t, statuses)
		retained[m.Topic()] = len(m.Payload()) > 0
	}

	// An unknown id and a malformed one each refuse the whole list.
	before := s.snapshot(t)
	_, errs, code := s.cli(t, "device", "revoke", "pi-m1", "pi-m2", "pi-ghost", "pi-m3")
	if code != 1 || !strings.Contains(errs, `no identity "pi-ghost"`) || !strings.Contains(errs, "nothing was revoked") {
		t.Fatalf("unknown id in the list: exit %d: %s", code, errs)
	}
	_, errs, code = s.cliIn(t, "pi-m1\npi-m2\n\nPI-M3\n", "device", "revoke", "--from", "-")
	if code != 2 || !strings.Contains(errs, "stdin line 4: id must be lower case") {
		t.Fatalf("malformed id in the list: exit %d: %s", code, errs)
	}
	if after := s.snapshot(t); after != before {
		t.Fatalf("a refused list changed the store:\n%s\n%s", before, after)
	}
	for i, ch := range lost {
		select {
		case err := <-ch:
			t.Fatalf("%s lost its session after a refused list: %v", ids[i], err)
		default:
		}
	}

	// The list from a file, with a comment, a blank line and a repeat.
	list := filepath.Join(t.TempDir(), "ids.txt")
	if err := os.WriteFile(list, []byte("# stolen pallet\npi-m2\n\n  pi-m3  \npi-m1\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, errs, code := s.cli(t, "device", "revoke", "pi-m4", "pi-m1", "--from", list)
	if code != 0 {
		t.Fatalf("revoke list: exit %d: %s", code, errs)
	}
	for i, ch := range lost {
		lostWithinASecond(t, ch, start, ids[i]+"'s session")
	}
	wantOut := "pi-m4 revoked (1 certificate(s))\npi-m1 revoked (1 certificate(s))\npi-m2 revoked (1 certificate(s))\n" +
		"pi-m3 revoked (1 certificate(s))\n4 revoked, 0 already revoked; the sessions of those revoked are closed and the CRL is updated\n"
	if out != wantOut {
		t.Errorf("output:\n%s\nwant:\n%s", out, wantOut)
	}
	cleared := map[string]bool{}
	for len(cleared) < len(ids) {
		if m := nextStatus(t, statuses); len(m.Payload()) == 0 {
			cleared[m.Topic()] = true
		}
	}
	for _, id := range ids {
		if !cleared["devices/"+id+"/status"] {
			t.Errorf("%s's status not emptied: %v", id, cleared)
		}
		if err := s.handshake(devs[id]); err == nil {
			t.Errorf("%s's handshake not refused", id)
		}
	}
	if s.deviceInfo(t, "pi-keep").Revoked() {
		t.Error("pi-keep, not in the list, revoked")
	}
	crl := fetchCRL(t, s)
	for _, id := range ids {
		if !slices.ContainsFunc(crl.RevokedCertificateEntries, func(e x509.RevocationListEntry) bool {
			return e.SerialNumber.Cmp(devs[id].cert.SerialNumber) == 0
		}) {
			t.Errorf("%s's certificate not on the CRL", id)
		}
	}
	if n := len(crl.RevokedCertificateEntries); n != len(ids) {
		t.Errorf("CRL lists %d certificates, want %d", n, len(ids))
	}
	if got := storetest.Audited(t, s.Store(), store.ActDeviceRevoke, time.Time{}); !slices.Equal(got, ids) {
		t.Errorf("device.revoke audited for %v, want %v", got, ids)
	}

	// Already revoked ids mixed in: reported, the rest revoked, exit 1.
	s.enroll(t, s.token(t), "pi-m5")
	out, errs, code = s.cliIn(t, "pi-m1\npi-m5\n", "device", "revoke", "--from", "-", "--json")
	if code != 1 || !strings.Contains(errs, "1 of the 2 ids already revoked before: nothing changed for those") {
		t.Fatalf("list with a revoked id: exit %d: %s", code, errs)
	}
	for _, want := range []string{`"device_id": "pi-m1"`, `"result": "already_revoked"`, `"device_id": "pi-m5"`, `"result": "revoked"`} {
		if !strings.Contains(out, want) {
			t.Errorf("--json output lacks %s:\n%s", want, out)
		}
	}
	if info := s.deviceInfo(t, "pi-m5"); !info.Revoked() {
		t.Error("pi-m5 not revoked beside an id already revoked")
	}
	// A list revoked before, all of it: no "others" said to be revoked.
	out, errs, code = s.cli(t, "device", "revoke", "pi-m5", "pi-m1")
	if code != 1 || !strings.HasSuffix(out, "\n0 revoked, 2 already revoked\n") || !strings.Contains(errs, "all 2 ids were already revoked before: nothing changed") {
		t.Errorf("list already revoked: exit %d: %s%s", code, out, errs)
	}
	// The single revoke is as it was.
	if _, errs, code := s.cli(t, "device", "revoke", "pi-m5"); code != 1 || !strings.Contains(errs, "pi-m5 was already revoked; nothing changed") {
		t.Errorf("single revoke of a revoked id: exit %d: %s", code, errs)
	}
}

// nextStatus waits for the next status message the watcher receives.
func nextStatus(tb testing.TB, ch <-chan paho.Message) paho.Message {
	tb.Helper()
	select {
	case m := <-ch:
		return m
	case <-time.After(10 * time.Second):
		tb.Fatal("no status message within 10s")
		return nil
	}
}
