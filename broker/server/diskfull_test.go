package server_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/metrics/metricstest"
)

// v5Client is a minimal MQTT 5 publisher: it reads PUBACK reason codes,
// which 3.1.1 cannot carry.
type v5Client struct {
	tb   testing.TB
	conn *tls.Conn
	br   *bufio.Reader
	next uint16
}

func dialV5(tb testing.TB, addr string, cfg *tls.Config, id string) *v5Client {
	tb.Helper()
	d := net.Dialer{Timeout: 30 * time.Second}
	conn, err := tls.DialWithDialer(&d, "tcp", addr, cfg)
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	tb.Cleanup(func() { _ = conn.Close() })
	c := &v5Client{tb: tb, conn: conn, br: bufio.NewReader(conn)}
	c.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id},
	})
	if typ, body := c.read(); typ != packets.Connack || len(body) < 2 || body[1] != 0 {
		tb.Fatalf("CONNACK type %d body %x", typ, body)
	}
	return c
}

func (c *v5Client) send(pk packets.Packet) {
	c.tb.Helper()
	var buf bytes.Buffer
	var err error
	if pk.FixedHeader.Type == packets.Connect {
		err = pk.ConnectEncode(&buf)
	} else {
		err = pk.PublishEncode(&buf)
	}
	if err != nil {
		c.tb.Fatalf("encode: %v", err)
	}
	_ = c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		c.tb.Fatalf("write: %v", err)
	}
}

func (c *v5Client) read() (byte, []byte) {
	c.tb.Helper()
	q := &qos1Client{br: c.br}
	typ, body, err := q.read()
	if err != nil {
		c.tb.Fatalf("read: %v", err)
	}
	return typ, body
}

// publish sends a QoS 1 message and returns its PUBACK's reason code.
func (c *v5Client) publish(topic string, payload []byte) byte {
	c.tb.Helper()
	c.next++
	c.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 5,
		TopicName: topic, PacketID: c.next, Payload: payload,
	})
	for {
		typ, body := c.read()
		if typ != packets.Puback || len(body) < 2 || uint16(body[0])<<8|uint16(body[1]) != c.next {
			continue
		}
		if len(body) == 2 {
			return 0 // success may leave the reason code out
		}
		return body[2]
	}
}

// TestDiskFullNode runs the fleetmq binary with its file size capped at
// 2 MiB (prlimit --fsize: writes past it fail, as on a full disk). QoS 1
// telemetry that cannot be stored is refused — the MQTT 5 publisher gets
// PUBACK 0x80 —, is not stored, and shows in the metrics; the node keeps
// serving; once the cap is lifted (space freed) the same connection
// stores again, without a restart, and the file passes bbolt's check.
func TestDiskFullNode(t *testing.T) {
	prlimit := prlimitPath(t)
	bin := buildFleetmq(t)
	data := filepath.Join(t.TempDir(), "data")
	n := startNode(t, bin, data, []string{prlimit, "--fsize=" + strconv.Itoa(2<<20) + ":unlimited", "--"},
		"--publish-rate", "10000", "--publish-burst", "10000", "--metrics-addr", "127.0.0.1:0")
	d := n.device("full-")
	id := d.resp.DeviceID
	c := dialV5(t, n.mqttAddr, deviceTLS(n.ca(), d), id)
	topic := "devices/" + id + "/telemetry"
	pad := strings.Repeat("x", 16<<10)
	msg := func(i int) []byte { return fmt.Appendf(nil, `{"n":%d,"pad":%q}`, i, pad) }

	acked := map[int]bool{}
	refused := -1
	for i := range 1000 {
		switch code := c.publish(topic, msg(i)); code {
		case 0:
			acked[i] = true
			continue
		case 0x80:
			refused = i
		default:
			t.Fatalf("message %d: PUBACK reason %#x, want 0 or 0x80 (unspecified error)", i, code)
		}
		break
	}
	if refused < 0 {
		t.Fatal("16 MiB of telemetry stored under a 2 MiB file size limit")
	}
	t.Logf("%d messages stored, message %d refused", len(acked), refused)

	fams := metricstest.Scrape(t, n.metricsURL)
	for _, m := range [][]string{{"fleetmq_store_commit_failures_total"}, {"fleetmq_telemetry_rejected_total", "reason", "store_error"}} {
		if v, ok := fams.Value(m[0], m[1:]...); !ok || v < 1 {
			t.Errorf("%s%v = %v, want at least 1", m[0], m[1:], v)
		}
	}
	resp, err := n.httpsClient().Get("https://" + n.enrollAddr + "/v1/ca")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("enrollment endpoint on a full disk: %v %v", resp, err)
	}
	resp.Body.Close()
	// The operator is told why, not "internal error".
	_, err = n.admin().CreateTokens(context.Background(), admin.TokenRequest{Count: 1000, Prefix: "more-"})
	if err == nil || !strings.Contains(err.Error(), "disk is full") || !strings.Contains(err.Error(), "unavailable") {
		t.Errorf("1000 tokens on a full disk: %v, want unavailable: disk is full", err)
	}

	if out, err := exec.Command(prlimit, "--pid", strconv.Itoa(n.cmd.Process.Pid), "--fsize=unlimited").CombinedOutput(); err != nil {
		t.Fatalf("lift the limit: %v %s", err, out)
	}
	if code := c.publish(topic, msg(refused+1)); code != 0 {
		t.Fatalf("after the limit was lifted: PUBACK reason %#x", code)
	}
	acked[refused+1] = true
	got := n.storedNumbers(id)
	if got[refused] || len(got) != len(acked) {
		t.Fatalf("stored %d messages (the refused one: %v), want exactly the %d acknowledged", len(got), got[refused], len(acked))
	}
	for i := range acked {
		if !got[i] {
			t.Fatalf("acknowledged message %d is not stored", i)
		}
	}
	n.stop()
	checkStoreFile(t, data)
}
