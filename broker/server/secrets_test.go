package server_test

import (
	"context"
	"crypto"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/store"
)

// secrets collects what must never reach a log, with a name for each.
type secrets map[string]string

// token adds a bootstrap token: the whole of it, and its secret part,
// which is what an attacker needs.
func (s secrets) token(name, tok string) {
	s[name] = tok
	if parts := strings.Split(tok, "."); len(parts) == 3 && len(parts[1]) >= 16 {
		s[name+" secret"] = parts[1]
	}
}

// keyFile adds a PEM private key: the base64 of its DER as a whole, and
// every 64-character line of its PEM body (a log may hold a fragment).
func (s secrets) keyFile(tb testing.TB, name, path string) {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		tb.Fatalf("%s: no PEM", path)
	}
	s[name] = base64.StdEncoding.EncodeToString(block.Bytes)
	s[name+" hex"] = hex.EncodeToString(block.Bytes)
	for i, line := range strings.Split(string(b), "\n") {
		if len(line) == 64 {
			s[fmt.Sprintf("%s line %d", name, i)] = line
		}
	}
}

// assertNotIn fails for every secret found in text.
func (s secrets) assertNotIn(tb testing.TB, where, text string) {
	tb.Helper()
	if len(text) == 0 {
		tb.Fatalf("%s is empty: nothing was checked", where)
	}
	for name, v := range s {
		if strings.Contains(text, v) {
			tb.Errorf("%s contains %s", where, name)
		}
	}
}

// TestSecretsNeverLogged runs enrollment, EST, renewal, refused requests,
// operator commands and MQTT traffic of every kind with the logger at trace
// level, and then searches the log for every token, private key and
// payload involved.
func TestSecretsNeverLogged(t *testing.T) {
	logs := &syncBuffer{}
	s := startServer(t, func(c *server.Config) {
		c.Logger = zerolog.New(logs).Level(zerolog.TraceLevel)
		c.Broker.MaxTelemetryPayload = 1024
		c.Enroll.FailureBurst = 1000
	})
	must := secrets{}
	const marker = "PAYLOAD-MARKER-c41e"
	for i := range 10 {
		must[fmt.Sprintf("payload %d", i)] = fmt.Sprintf("%s-%d", marker, i)
	}
	payload := func(i int) string { return must[fmt.Sprintf("payload %d", i)] }
	must.keyFile(t, "CA key", filepath.Join(s.cfg.DataDir, "ca.key"))

	// Enrollment: a success, and refusals carrying tokens.
	bound := s.token(t, "--device", "pi-s1")
	must.token("enrolled token", bound)
	d := s.enroll(t, bound, "pi-s1")
	free := s.token(t, "--uses", "10")
	must.token("free token", free)
	foreign := foreignToken(t)
	must.token("foreign token", foreign)
	must.token("malformed token", free[:len(free)-3]+"xyz!")
	for _, tok := range []string{free, foreign, free[:len(free)-3] + "xyz!"} {
		s.ask(t, s.client(nil), "POST", "/v1/enroll", map[string]string{"Authorization": "Bearer " + tok, "Content-Type": "text/plain"}, strings.NewReader("x"))
		s.ask(t, s.client(nil), "POST", "/v1/enroll", bearer(tok), strings.NewReader(string(csrPEM(t, newKey(t), "Bad/Id"))))
		s.ask(t, s.client(nil), "POST", "/.well-known/est/simpleenroll", map[string]string{
			"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("x:"+tok)), "Content-Type": "application/pkcs10",
		}, strings.NewReader("!!"))
	}
	estTok := s.token(t)
	must.token("EST token", estTok)
	der, _ := pem.Decode(csrPEM(t, newKey(t), "pi-est"))
	if r := s.ask(t, s.client(nil), "POST", "/.well-known/est/simpleenroll", map[string]string{
		"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("pi-est:"+estTok)), "Content-Type": "application/pkcs10",
	}, strings.NewReader(base64.StdEncoding.EncodeToString(der.Bytes))); r.status != http.StatusOK {
		t.Fatalf("EST enroll: %d %s", r.status, r.body)
	}
	// Renewal over mTLS.
	if a := s.post(t, s.client(d.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(t, newKey(t), "pi-s1")); a.status != http.StatusOK {
		t.Fatalf("renew: %d %s", a.status, a.body)
	}

	// An operator issues a service; its key is made by the CLI.
	svcDir := t.TempDir()
	if _, errs, code := s.cli(t, "service", "issue", "backend", "--out", svcDir); code != 0 {
		t.Fatalf("service issue: %s", errs)
	}
	must.keyFile(t, "service key", filepath.Join(svcDir, "backend.key"))
	svcCert, err := tls.LoadX509KeyPair(filepath.Join(svcDir, "backend.pem"), filepath.Join(svcDir, "backend.key"))
	if err != nil {
		t.Fatal(err)
	}
	svc := &device{key: svcCert.PrivateKey.(crypto.Signer), cert: svcCert.Leaf}

	// MQTT: a device publishing every kind of message with a marker, some
	// refused, a service commanding it, and its will.
	dev := s.identity(t, "pi-m", store.RoleDevice)
	got, status := make(chan string, 20), make(chan string, 20)
	sub := pahoClient(t, s, svc, "backend", nil)
	defer sub.Disconnect(0)
	for filter, ch := range map[string]chan string{"devices/+/telemetry/#": got, "devices/+/status": status} {
		if tok := sub.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) { ch <- string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
	}
	opts := paho.NewClientOptions().AddBroker("tls://"+s.MQTTAddr().String()).SetClientID("pi-m").SetProtocolVersion(4).
		SetAutoReconnect(false).SetTLSConfig(s.mqttTLS(dev)).SetWill("devices/pi-m/status", payload(0), 1, true)
	pc := paho.NewClient(opts)
	if tok := pc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	defer pc.Disconnect(0)
	cmds := make(chan string, 5)
	if tok := pc.Subscribe("devices/pi-m/commands/#", 1, func(_ paho.Client, m paho.Message) { cmds <- string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	for qos := range byte(3) {
		if tok := pc.Publish("devices/pi-m/telemetry", qos, false, payload(1+int(qos))); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
	}
	pc.Publish("devices/pi-m/events/boot", 1, false, payload(4)).WaitTimeout(10 * time.Second)
	pc.Publish("devices/pi-m/status", 1, true, payload(5)).WaitTimeout(10 * time.Second)
	// Over MaxTelemetryPayload: refused.
	pc.Publish("devices/pi-m/telemetry", 0, false, payload(6)+strings.Repeat("x", 2048)).WaitTimeout(10 * time.Second)
	if tok := sub.Publish("devices/pi-m/commands/reboot", 1, false, payload(7)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	receive := func(ch chan string, want string) {
		t.Helper()
		for {
			select {
			case m := <-ch:
				if m == want {
					return
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%q not delivered", want)
			}
		}
	}
	receive(cmds, payload(7))
	receive(got, payload(3))
	receive(status, payload(5))
	// The admin API streams payloads to the operator, not to the log.
	if err := admin.NewClient(s.AdminSocket()).Telemetry(context.Background(), "pi-m", "", 10, false, func(admin.TelemetryRecord) error { return nil }); err != nil {
		t.Fatal(err)
	}
	// A malformed publish (wildcard topic) ends its connection; a denied
	// one (another device's topic) ends the device's, which fires its will.
	r := dialMQTT(t, s.MQTTAddr().String(), s.mqttTLS(dev))
	if code := r.connect("pi-m", 30); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	r.send(publishPacket(1, "devices/pi-m/telemetry/#", 1, payload(8)))
	r.closedWithin(10 * time.Second)
	pc = paho.NewClient(opts)
	if tok := pc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	pc.Publish("devices/pi-s1/telemetry", 1, false, payload(9)).WaitTimeout(10 * time.Second)
	receive(status, payload(0))

	text := logs.String()
	for _, want := range []string{`"level":"debug"`, "device enrolled", "request refused"} {
		if !strings.Contains(text, want) {
			t.Errorf("the log lacks %s: the scenario did not run as planned", want)
		}
	}
	must.assertNotIn(t, "the server log", text)
}

// umask000 runs a command with umask 0, so that only the modes fleetmq sets
// itself protect what it writes.
var umask000 = []string{"sh", "-c", `umask 000 && exec "$0" "$@"`}

// TestBinaryFileModesAndLog runs the fleetmq binary with umask 0, a data
// folder created world-writable, and trace logging: the folder ends up
// 0700; the CA key, database, admin socket, service key and token CSV
// 0600; and the process's log holds no token, key or payload.
func TestBinaryFileModesAndLog(t *testing.T) {
	bin := buildFleetmq(t)
	data := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(data, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(data, 0o777); err != nil { // past the test's umask
		t.Fatal(err)
	}
	n := startNode(t, bin, data, umask000, "--log-level", "trace")
	must := secrets{}
	must.keyFile(t, "CA key", filepath.Join(data, "ca.key"))
	const marker = "BINARY-PAYLOAD-MARKER-9d02"

	toks := n.tokens(1, "pi-b")
	must.token("enrolled token", toks[0].Secret)
	d, err := enrollOver(n.httpsClient(), n.enrollAddr, toks[0].Secret, "")
	if err != nil {
		t.Fatal(err)
	}
	foreign := foreignToken(t)
	must.token("foreign token", foreign)
	if _, err := enrollOver(n.httpsClient(), n.enrollAddr, foreign, "pi-x"); err == nil {
		t.Fatal("a foreign token enrolled")
	}
	c, err := dialQoS1(n.mqttAddr, deviceTLS(n.ca(), d), d.resp.DeviceID, 30)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.publish("devices/"+c.id+"/telemetry", []byte(marker+"-1")); err != nil {
		t.Fatal(err)
	}
	must["payload 1"] = marker + "-1"
	// A wildcard topic ends the connection; mochi logs the packet's error.
	must["payload 2"] = marker + "-2"
	if err := c.publish("devices/"+c.id+"/telemetry/#", []byte(marker+"-2")); err == nil {
		t.Fatal("a publish to a wildcard topic was acknowledged")
	}
	c.close()

	// Operator commands through the binary, with umask 0 as well.
	out := t.TempDir()
	cli := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(umask000[0], append(append(umask000[1:], bin), append(args, "--data", data)...)...)
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("fleetmq %s: %v\n%s", strings.Join(args, " "), err, b)
		}
		return string(b)
	}
	cli("service", "issue", "backend", "--out", out)
	csvPath := filepath.Join(out, "tokens.csv")
	cli("token", "create", "--count", "3", "--prefix", "t-", "--csv", csvPath)
	must.keyFile(t, "service key", filepath.Join(out, "backend.key"))

	modes := map[string]os.FileMode{
		data:                                  0o700,
		filepath.Join(data, "ca.key"):         0o600,
		filepath.Join(data, server.DBName):    0o600,
		filepath.Join(data, admin.SocketName): 0o600,
		filepath.Join(out, "backend.key"):     0o600,
		csvPath:                               0o600,
	}
	checkModes := func(when string, skip string) {
		t.Helper()
		for path, want := range modes {
			if path == skip {
				continue
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Errorf("%s: %v", when, err)
				continue
			}
			if got := fi.Mode().Perm(); got != want {
				t.Errorf("%s: %s has mode %v, want %v", when, path, got, want)
			}
		}
	}
	checkModes("running", "")
	n.stop()
	checkModes("stopped", filepath.Join(data, admin.SocketName))
	must.assertNotIn(t, "the fleetmq log", n.logs.String())
	if !strings.Contains(n.logs.String(), `"level":"debug"`) {
		t.Error("no debug line in the log: the level did not apply")
	}
}
