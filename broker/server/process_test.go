package server_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
)

// buildFleetmq builds the fleetmq command into a temporary folder: the
// tests below run it as its own process, to kill it for real.
func buildFleetmq(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "fleetmq")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/fleetmq/fleetmq/broker/cmd/fleetmq")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build fleetmq: %v\n%s", err, out)
	}
	return bin
}

// node is a fleetmq server running as a child process.
type node struct {
	tb     testing.TB
	cmd    *exec.Cmd
	data   string
	logs   *syncBuffer
	exited chan struct{}
	err    error // of Wait, once exited is closed

	enrollAddr, mqttAddr string
	metricsURL           string // "" unless --metrics-addr is set
}

// startNode runs `fleetmq serve` on data with ephemeral ports, JSON logs and
// no metrics or dashboard listener, and waits for its "fleetmq serving"
// line, which names the bound addresses. wrap, if any, is the command line
// prefix that runs it (e.g. prlimit).
func startNode(tb testing.TB, bin, data string, wrap []string, flags ...string) *node {
	tb.Helper()
	args := append(append(wrap[:len(wrap):len(wrap)], bin, "serve", "--data", data,
		"--enroll-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0",
		"--metrics-addr", "off", "--ui-addr", "off", "--log-format", "json"), flags...)
	return runNode(tb, args, append(os.Environ(), "FLEETMQ_DATA="+data), data)
}

// device enrolls one device bound to prefix0001 through the enrollment API.
func (n *node) device(prefix string) *device {
	n.tb.Helper()
	tok := n.tokens(1, prefix)
	d, err := enrollOver(n.httpsClient(), n.enrollAddr, tok[0].Secret, "")
	if err != nil {
		n.tb.Fatalf("enroll: %v", err)
	}
	return d
}

// startNodeWithFDs runs a node limited to nofile open file descriptors.
func startNodeWithFDs(tb testing.TB, nofile int, flags ...string) *node {
	tb.Helper()
	lim := strconv.Itoa(nofile)
	return startNode(tb, buildFleetmq(tb), filepath.Join(tb.TempDir(), "data"),
		[]string{prlimitPath(tb), "--nofile=" + lim + ":" + lim, "--"}, flags...)
}

// prlimitPath returns the path of prlimit (util-linux), which the tests use
// to give a process a real resource limit.
func prlimitPath(tb testing.TB) string {
	tb.Helper()
	p, err := exec.LookPath("prlimit")
	if err != nil {
		tb.Fatalf("prlimit (util-linux) is needed: %v", err)
	}
	return p
}

// runNode runs the command line args, a `fleetmq serve` using data, with
// env, and waits for its "fleetmq serving" line (logs must be JSON).
func runNode(tb testing.TB, args, env []string, data string) *node {
	tb.Helper()
	n := &node{tb: tb, data: data, logs: &syncBuffer{}, exited: make(chan struct{})}
	n.cmd = exec.Command(args[0], args[1:]...)
	n.cmd.Env = env
	pr, pw := io.Pipe()
	n.cmd.Stderr = pw
	n.cmd.Stdout = pw
	if err := n.cmd.Start(); err != nil {
		tb.Fatalf("start fleetmq: %v", err)
	}
	ready := make(chan [3]string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			n.logs.Write(line)
			n.logs.Write([]byte{'\n'})
			var l struct{ Message, Enroll, MQTT, Metrics string }
			if json.Unmarshal(line, &l) == nil && l.Message == "fleetmq serving" {
				select {
				case ready <- [3]string{l.Enroll, l.MQTT, l.Metrics}:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() {
		n.err = n.cmd.Wait()
		pw.Close()
		close(n.exited)
	}()
	tb.Cleanup(func() {
		n.kill()
		if tb.Failed() {
			tb.Logf("fleetmq log (%s):\n%s", data, tail(n.logs.String(), 60))
		}
	})
	select {
	case addrs := <-ready:
		n.enrollAddr, n.mqttAddr, n.metricsURL = addrs[0], addrs[1], addrs[2]
	case <-n.exited:
		tb.Fatalf("fleetmq exited before serving: %v\n%s", n.err, n.logs.String())
	case <-time.After(60 * time.Second):
		tb.Fatalf("fleetmq not serving after 60s:\n%s", n.logs.String())
	}
	return n
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// kill sends SIGKILL and waits for the process to end.
func (n *node) kill() {
	select {
	case <-n.exited:
		return
	default:
	}
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.exited
}

// stop asks for a clean shutdown (SIGTERM) and fails unless it exits 0
// within a minute.
func (n *node) stop() {
	n.tb.Helper()
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(time.Minute):
		n.kill()
		n.tb.Fatal("fleetmq did not stop within a minute of SIGTERM")
	}
	if n.err != nil {
		n.tb.Fatalf("fleetmq exited with %v", n.err)
	}
}

func (n *node) admin() *admin.Client { return admin.NewClient(filepath.Join(n.data, admin.SocketName)) }

// ca returns the fleet CA the node wrote into its data folder.
func (n *node) ca() *x509.CertPool {
	n.tb.Helper()
	b, err := os.ReadFile(filepath.Join(n.data, "ca.pem"))
	if err != nil {
		n.tb.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		n.tb.Fatal("no CA certificate in ca.pem")
	}
	return pool
}

// tokens mints n single-use tokens through the admin socket; with prefix
// they are bound to prefix0001…, otherwise free.
func (n *node) tokens(count int, prefix string) []admin.NewToken {
	n.tb.Helper()
	ctx := context.Background()
	if prefix != "" {
		toks, err := n.admin().CreateTokens(ctx, admin.TokenRequest{Count: count, Prefix: prefix})
		if err != nil {
			n.tb.Fatalf("create tokens: %v", err)
		}
		return toks
	}
	var out []admin.NewToken
	for range count {
		toks, err := n.admin().CreateTokens(ctx, admin.TokenRequest{})
		if err != nil {
			n.tb.Fatalf("create token: %v", err)
		}
		out = append(out, toks...)
	}
	return out
}

// httpsClient trusts the node's CA.
func (n *node) httpsClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: n.ca()}, MaxIdleConnsPerHost: 64},
		Timeout:   30 * time.Second,
	}
}

// enrollOver enrolls id with tok at the enrollment address; unlike
// testServer.enroll it returns errors, for use while the server dies.
func enrollOver(c *http.Client, addr, tok, id string) (*device, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, key)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequest(http.MethodPost, "https://"+addr+"/v1/enroll", bytes.NewReader(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr})))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/pkcs10")
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusCreated {
		return nil, &enrollRefused{status: resp.StatusCode, body: string(body)}
	}
	var r enroll.Response
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, err
	}
	block, _ := pem.Decode([]byte(r.Certificate))
	if block == nil {
		return nil, errors.New("no certificate in the answer")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, err
	}
	return &device{key: key, cert: cert, resp: r}, nil
}

type enrollRefused struct {
	status int
	body   string
}

func (e *enrollRefused) Error() string {
	return fmt.Sprintf("enrollment refused: %d %s", e.status, e.body)
}

// qos1Client is a minimal MQTT 3.1.1 device over TLS that publishes at QoS
// 1 and knows exactly which publishes the broker acknowledged: paho reports
// success for a publish cut short by a dropped connection.
type qos1Client struct {
	id   string
	conn *tls.Conn
	br   *bufio.Reader
	next uint16
}

func dialQoS1(addr string, cfg *tls.Config, id string, keepalive uint16) (*qos1Client, error) {
	d := net.Dialer{Timeout: 30 * time.Second}
	conn, err := tls.DialWithDialer(&d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	c := &qos1Client{id: id, conn: conn, br: bufio.NewReader(conn)}
	var buf bytes.Buffer
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect:         packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: keepalive, ClientIdentifier: id},
	}
	if err := pk.ConnectEncode(&buf); err != nil {
		conn.Close()
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		conn.Close()
		return nil, err
	}
	typ, body, err := c.read()
	if err != nil {
		conn.Close()
		return nil, err
	}
	if typ != packets.Connack || len(body) != 2 || body[1] != 0 {
		conn.Close()
		return nil, fmt.Errorf("CONNACK type %d body %x", typ, body)
	}
	return c, nil
}

func (c *qos1Client) read() (byte, []byte, error) {
	hb, err := c.br.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, _, err := packets.DecodeLength(c.br)
	if err != nil {
		return 0, nil, err
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.br, body); err != nil {
		return 0, nil, err
	}
	return hb >> 4, body, nil
}

// publish sends one QoS 1 message and returns nil once its PUBACK arrived.
func (c *qos1Client) publish(topic string, payload []byte) error {
	c.next++
	if c.next == 0 {
		c.next = 1
	}
	id := c.next
	_ = c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.conn.Write(publishPacket(1, topic, id, string(payload))); err != nil {
		return err
	}
	for {
		typ, body, err := c.read()
		if err != nil {
			return err
		}
		if typ == packets.Puback && len(body) >= 2 && binary.BigEndian.Uint16(body) == id {
			return nil
		}
	}
}

func (c *qos1Client) close() { _ = c.conn.Close() }

// storedNumbers reads device id's telemetry through the admin socket and
// returns the "n" of each message, as published by the tests.
func (n *node) storedNumbers(id string) map[int]bool {
	n.tb.Helper()
	got := map[int]bool{}
	err := n.admin().Telemetry(context.Background(), id, "", 100_000, false, func(r admin.TelemetryRecord) error {
		var p struct{ N int }
		if err := json.Unmarshal(r.Payload, &p); err != nil {
			return fmt.Errorf("payload %s: %w", r.Payload, err)
		}
		got[p.N] = true
		return nil
	})
	if err != nil {
		n.tb.Fatalf("telemetry of %s: %v", id, err)
	}
	return got
}

// deviceTLS is a device's client configuration for a node.
func deviceTLS(pool *x509.CertPool, d *device) *tls.Config {
	return &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{*d.tlsCert()}}
}

// parallel runs fn(i) for i in [0, n) on workers goroutines and returns
// the first error.
func parallel(n, workers int, fn func(i int) error) error {
	var (
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
		next  = make(chan int)
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}
