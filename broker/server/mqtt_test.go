package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/server"
)

// files writes a device's key, certificate and the CA for command-line clients.
func (s *testServer) files(tb testing.TB, d *device, name string) (key, cert, ca string) {
	tb.Helper()
	dir := tb.TempDir()
	der, err := x509.MarshalPKCS8PrivateKey(d.key)
	if err != nil {
		tb.Fatal(err)
	}
	key, cert, ca = filepath.Join(dir, name+".key"), filepath.Join(dir, name+".pem"), filepath.Join(dir, "ca.pem")
	for path, data := range map[string][]byte{
		key:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d.cert.Raw}),
		ca:   s.CA().ChainPEM(),
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	return key, cert, ca
}

func (s *testServer) mqttPort() string {
	_, port, _ := net.SplitHostPort(s.MQTTAddr().String())
	return port
}

// mosq runs mosquitto_pub or mosquitto_sub against the broker and returns
// its combined output and exit error.
func (s *testServer) mosq(tb testing.TB, tool string, args ...string) (string, error) {
	tb.Helper()
	path, err := exec.LookPath(tool)
	if err != nil {
		tb.Fatalf("%s not installed (scripts/test.sh installs mosquitto-clients): %v", tool, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	full := append([]string{"-h", "127.0.0.1", "-p", s.mqttPort()}, args...)
	out, err := exec.CommandContext(ctx, path, full...).CombinedOutput()
	return string(out), err
}

func TestMosquittoClients(t *testing.T) {
	s := startServer(t)
	d := s.enroll(t, s.token(t), "pi-m1")
	key, cert, ca := s.files(t, d, "pi-m1")
	tlsArgs := []string{"--cafile", ca, "--cert", cert, "--key", key}

	// A backend with a service certificate sees every device's telemetry.
	svcDir := t.TempDir()
	if _, errs, code := s.cli(t, "service", "issue", "backend", "--out", svcDir); code != 0 {
		t.Fatalf("service issue: %s", errs)
	}
	if fi, err := os.Stat(filepath.Join(svcDir, "backend.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("service key mode: %v %v", fi, err)
	}
	subCtx, cancelSub := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelSub()
	sub := exec.CommandContext(subCtx, "mosquitto_sub", "-h", "127.0.0.1", "-p", s.mqttPort(),
		"--cafile", filepath.Join(svcDir, "ca.pem"), "--cert", filepath.Join(svcDir, "backend.pem"),
		"--key", filepath.Join(svcDir, "backend.key"), "-i", "backend", "-t", "devices/+/telemetry/#",
		"-v", "-C", "1", "-q", "1")
	stdout, _ := sub.StdoutPipe()
	sub.Stderr = os.Stderr
	if err := sub.Start(); err != nil {
		t.Fatal(err)
	}
	// Publish until the subscriber (which may still be connecting) gets one.
	got := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		got <- line
	}()
	deadline := time.After(15 * time.Second)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var line string
wait:
	for {
		if out, err := s.mosq(t, "mosquitto_pub", append(tlsArgs, "-i", "pi-m1", "-q", "1", "-t", "devices/pi-m1/telemetry", "-m", `{"cpu_temp_c":41.5}`)...); err != nil {
			t.Fatalf("mosquitto_pub: %v %s", err, out)
		}
		select {
		case line = <-got:
			break wait
		case <-deadline:
			t.Fatal("service subscriber received nothing")
		case <-tick.C:
		}
	}
	if line != "devices/pi-m1/telemetry {\"cpu_temp_c\":41.5}\n" {
		t.Fatalf("subscriber got %q", line)
	}
	sub.Wait()

	// The QoS 1 message is queryable through the CLI.
	out, _, code := s.cli(t, "telemetry", "pi-m1", "--json")
	if code != 0 || !strings.Contains(out, `"payload":{"cpu_temp_c":41.5}`) {
		t.Fatalf("telemetry --json:\n%s", out)
	}
	// Binary payloads come back byte for byte; a device's escape
	// sequences never reach the operator's terminal raw.
	bin := filepath.Join(t.TempDir(), "payload.bin")
	if err := os.WriteFile(bin, []byte{0xff, 0x00, 0x01, 0xfe}, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, m := range [][]string{{"-f", bin}, {"-m", "\x1b[2J\x1b[31mred\nline"}, {"-m", "rtl\u202eevil"}, {"-m", "one\u2028two\u2029three"}} {
		if out, err := s.mosq(t, "mosquitto_pub", append(append(tlsArgs, "-i", "pi-m1", "-q", "1", "-t", "devices/pi-m1/telemetry/raw"), m...)...); err != nil {
			t.Fatalf("mosquitto_pub %v: %v %s", m, err, out)
		}
	}
	out, _, _ = s.cli(t, "telemetry", "pi-m1", "--json")
	if !strings.Contains(out, `"payload_base64":"/wAB/g=="`) || !strings.Contains(out, `"payload":"\u001b[2J\u001b[31mred\nline"`) {
		t.Fatalf("telemetry --json of binary and control characters:\n%s", out)
	}
	out, _, _ = s.cli(t, "telemetry", "pi-m1")
	if strings.ContainsAny(out, "\x1b\x00\u202e\u2028\u2029") || !strings.Contains(out, `\x1b[31mred\nline`) || !strings.Contains(out, `rtl\u202eevil`) ||
		!strings.Contains(out, `one\u2028two\u2029three`) ||
		!strings.Contains(out, "(4 bytes, binary) base64:/wAB/g==") {
		t.Fatalf("telemetry:\n%q", out)
	}

	// Client id other than the CN: CONNACK not authorized.
	out, err := s.mosq(t, "mosquitto_pub", append(tlsArgs, "-i", "someone-else", "-t", "devices/pi-m1/telemetry", "-m", "x")...)
	if err == nil || !strings.Contains(strings.ToLower(out), "not authori") {
		t.Fatalf("wrong client id: %v %s", err, out)
	}
	// No certificate: the handshake fails.
	out, err = s.mosq(t, "mosquitto_pub", "--cafile", ca, "-i", "pi-m1", "-t", "devices/pi-m1/telemetry", "-m", "x")
	if err == nil {
		t.Fatalf("publish without certificate succeeded: %s", out)
	}
	// Subscriptions outside the device's grant are refused in the SUBACK.
	for _, filter := range []string{"#", "devices/+/telemetry", "$share/g/#", "devices/pi-other/commands/#"} {
		out, err := s.mosq(t, "mosquitto_sub", append(tlsArgs, "-i", "pi-m1", "-t", filter, "-C", "1", "-W", "5")...)
		// mosquitto_sub exits 0 after a refused SUBACK; it says so.
		if !strings.Contains(out, "denied") {
			t.Errorf("subscribe %q: %v %q", filter, err, out)
		}
	}
	// Its own command topic is fine (times out waiting, without a denial).
	out, _ = s.mosq(t, "mosquitto_sub", append(tlsArgs, "-i", "pi-m1", "-t", "devices/pi-m1/commands/#", "-C", "1", "-W", "1")...)
	if strings.Contains(out, "denied") {
		t.Errorf("own commands topic denied: %s", out)
	}
}

func pahoClient(tb testing.TB, s *testServer, d *device, id string, lost chan<- error) paho.Client {
	tb.Helper()
	opts := paho.NewClientOptions().
		AddBroker("tls://" + s.MQTTAddr().String()).
		SetClientID(id).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetTLSConfig(&tls.Config{RootCAs: s.CA().Pool(), Certificates: []tls.Certificate{*d.tlsCert()}, ClientSessionCache: tls.NewLRUClientSessionCache(8)})
	if lost != nil {
		opts.SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	}
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		tb.Fatalf("connect %s: %v", id, tok.Error())
	}
	return c
}

func TestRevokeThroughCLIDisconnectsWithinASecond(t *testing.T) {
	s := startServer(t)
	d := s.enroll(t, s.token(t), "pi-r1")
	lost := make(chan error, 1)
	c := pahoClient(t, s, d, "pi-r1", lost)
	defer c.Disconnect(0)

	out, _, _ := s.cli(t, "device", "list", "--online")
	if !strings.Contains(out, "pi-r1") {
		t.Fatalf("device not listed online:\n%s", out)
	}
	start := time.Now()
	if _, errs, code := s.cli(t, "device", "revoke", "pi-r1"); code != 0 {
		t.Fatalf("revoke: %s", errs)
	}
	lostWithinASecond(t, lost, start, "the revoked device's session")
	if err := s.handshake(d); err == nil {
		t.Fatal("revoked device's handshake not refused")
	}
}

// lostWithinASecond waits for a client's connection-lost report, which
// must come within a second of start.
func lostWithinASecond(tb testing.TB, lost <-chan error, start time.Time, what string) {
	tb.Helper()
	select {
	case <-lost:
		if took := time.Since(start); took > time.Second {
			tb.Fatalf("%s closed after %v", what, took)
		}
	case <-time.After(time.Second):
		tb.Fatalf("%s still open after one second", what)
	}
}

// handshake dials the broker with d's certificate and returns the TLS
// error that refused it, nil if the broker took it. In TLS 1.3 the client
// learns of a refusal on its first read, as an alert; the read's timeout
// means the server accepted the handshake.
func (s *testServer) handshake(d *device) error {
	conn, err := tls.Dial("tcp", s.MQTTAddr().String(), s.mqttTLS(d))
	if err == nil {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err != nil && strings.Contains(err.Error(), "tls:") {
		return err
	}
	return nil
}

// A device that has just disconnected is shown offline with its disconnect
// time as last seen, also while that change still waits to be stored
// (presence is written up to 250 ms later, in one commit for many).
func TestLastSeenRightAfterDisconnect(t *testing.T) {
	s := startServer(t)
	d := s.enroll(t, s.token(t), "pi-ls")
	c := pahoClient(t, s, d, "pi-ls", nil)
	connected := s.clock.Now()
	s.clock.Advance(time.Hour)
	c.Disconnect(0)
	var info admin.DeviceInfo
	eventually(t, func() bool { info = s.deviceInfo(t, "pi-ls"); return !info.Online }, "pi-ls offline")
	if !info.LastSeen.Equal(connected.Add(time.Hour)) {
		t.Fatalf("last seen %v, want the disconnect at %v (connected at %v)", info.LastSeen, connected.Add(time.Hour), connected)
	}
}

func TestTelemetrySurvivesRestart(t *testing.T) {
	dir := t.TempDir() + "/data"
	s := startServer(t, func(c *server.Config) { c.DataDir = dir })
	d := s.enroll(t, s.token(t), "pi-d1")
	c := pahoClient(t, s, d, "pi-d1", nil)
	for i := range 20 {
		tok := c.Publish("devices/pi-d1/telemetry", 1, false, fmt.Sprintf(`{"n":%d}`, i))
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d: %v", i, tok.Error())
		}
	}
	c.Disconnect(100)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := startServer(t, func(c *server.Config) { c.DataDir = dir })
	s2.wantNumbered(t, "pi-d1", 20)
	// The device reconnects to the restarted server with the same certificate.
	c2 := pahoClient(t, s2, d, "pi-d1", nil)
	c2.Disconnect(100)
}

// wantNumbered checks that id's stored telemetry is exactly {"n":0} …
// {"n":count-1}, in order.
func (s *testServer) wantNumbered(tb testing.TB, id string, count int) {
	tb.Helper()
	out, errs, code := s.cli(tb, "telemetry", id, "--json", "--limit", strconv.Itoa(count+100))
	if code != 0 {
		tb.Fatalf("telemetry: %s", errs)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != count {
		tb.Fatalf("%d messages stored, want %d:\n%s", len(lines), count, out)
	}
	for i, l := range lines {
		var rec admin.TelemetryRecord
		if err := json.Unmarshal([]byte(l), &rec); err != nil || string(rec.Payload) != fmt.Sprintf(`{"n":%d}`, i) {
			tb.Fatalf("message %d: %s (%v)", i, l, err)
		}
	}
}

func TestTelemetryFollow(t *testing.T) {
	s := startServer(t)
	c := pahoClient(t, s, s.enroll(t, s.token(t), "pi-f1"), "pi-f1", nil)
	defer c.Disconnect(0)
	publish(t, c, "devices/pi-f1/telemetry", `{"old":1}`)
	recs := followTelemetry(t, s, "pi-f1")
	nextRecord(t, recs, `{"old":1}`)
	publish(t, c, "devices/pi-f1/telemetry", "plain text")
	nextRecord(t, recs, `"plain text"`)
}
