package main

import (
	"bufio"
	"bytes"
	"strings"
	"testing"
	"time"
)

// Building this package is the point of running its tests in CI: the load
// generator is not run there, and must not rot. These cover the parts that
// can be wrong without a broker.

func TestRemainingLengthRoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455} {
		enc := encodeLength(nil, n)
		got, err := decodeLength(bufio.NewReader(bytes.NewReader(enc)))
		if err != nil || got != n {
			t.Errorf("%d: encoded % x, decoded %d, %v", n, enc, got, err)
		}
	}
	if _, err := decodeLength(bufio.NewReader(bytes.NewReader([]byte{0x80, 0x80, 0x80, 0x80, 1}))); err == nil {
		t.Error("a five-byte length was accepted")
	}
}

func TestPublishEncoding(t *testing.T) {
	for _, qos := range []byte{0, 1} {
		pk := appendPublish(nil, "devices/d/telemetry", qos, 0x1234, []byte("hello"))
		br := bufio.NewReader(bytes.NewReader(pk))
		c := &mqttConn{br: br}
		typ, flags, body, err := c.readPacket()
		if err != nil || typ != pktPublish || (flags>>1)&3 != qos {
			t.Fatalf("QoS %d: type %d flags %x: %v", qos, typ, flags, err)
		}
		topic, payload, err := parsePublish(flags, body)
		if err != nil || topic != "devices/d/telemetry" || string(payload) != "hello" {
			t.Fatalf("QoS %d: topic %q payload %q: %v", qos, topic, payload, err)
		}
		if qos == 1 && !bytes.Contains(body, []byte{0x12, 0x34}) {
			t.Fatalf("QoS 1 without its packet id: % x", body)
		}
	}
}

func TestConnectEncoding(t *testing.T) {
	pk := appendConnect(nil, "dev-1", 60)
	want := []byte{pktConnect << 4, 17, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 60, 0, 5, 'd', 'e', 'v', '-', '1'}
	if !bytes.Equal(pk, want) {
		t.Fatalf("CONNECT % x, want % x", pk, want)
	}
}

func TestPercentileAndMedian(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i))
	}
	if p := percentile(d, 0.5); p != 50 {
		t.Errorf("p50 = %d", p)
	}
	if p := percentile(d, 0.99); p != 99 {
		t.Errorf("p99 = %d", p)
	}
	if p := percentile(nil, 0.5); p != 0 {
		t.Errorf("p50 of nothing = %d", p)
	}
	if m := median([]float64{3, 1, 2}, id); m != 2 {
		t.Errorf("median = %g", m)
	}
	if m := median([]float64{4, 1, 2, 3}, id); m != 2.5 {
		t.Errorf("median = %g", m)
	}
}

func TestSpliceKeepsTheRestOfTheFile(t *testing.T) {
	section := beginMarker + "\nnew\n" + endMarker + "\n"
	for _, tc := range []struct{ doc, want string }{
		{"", "# Benchmarks\n\n" + section},
		{"# B\n\nintro\n", "# B\n\nintro\n\n" + section},
		{"# B\n" + beginMarker + "\nold\n" + endMarker + "\n## Other\nkept\n", "# B\n" + section + "## Other\nkept\n"},
	} {
		if got := splice(tc.doc, section); got != tc.want {
			t.Errorf("splice(%q) =\n%s\nwant\n%s", tc.doc, got, tc.want)
		}
	}
}

func TestRowTargets(t *testing.T) {
	r := row{what: "x", fleet: 3, mosq: 2, format: perSec, higherBetter: true, target: 1.0}
	if c := r.cells(); !strings.Contains(c[4], "met") || strings.Contains(c[4], "not") || c[3] != "1.50×" {
		t.Errorf("cells %q", c)
	}
	r = row{what: "x", fleet: 3, mosq: 2, format: kib, higherBetter: false, target: 1.0}
	if c := r.cells(); !strings.Contains(c[4], "not met") {
		t.Errorf("cells %q", c)
	}
	if thousands(1234567) != "1,234,567" || thousands(12) != "12" {
		t.Errorf("thousands: %s %s", thousands(1234567), thousands(12))
	}
}
