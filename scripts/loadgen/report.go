package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Markers around the part of BENCHMARKS.md this tool rewrites.
const (
	beginMarker = "<!-- bench.sh:begin -->"
	endMarker   = "<!-- bench.sh:end -->"
)

type machine struct {
	cpus    int
	model   string
	kernel  string
	loadavg string
	goVer   string
}

func describeMachine() machine {
	m := machine{cpus: runtime.NumCPU(), goVer: runtime.Version()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m.loadavg = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	return m
}

func mosquittoVersion(bin string) string {
	// mosquitto -h prints its version on the first line and exits 3.
	out, _ := exec.Command(bin, "-h").CombinedOutput()
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}

// median of the rounds' values.
func median[T any](xs []T, f func(T) float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func id(x float64) float64        { return x }
func dur(d time.Duration) float64 { return float64(d) }
func ms(ns float64) string        { return fmt.Sprintf("%.2f ms", ns/1e6) }
func us(ns float64) string {
	if ns < 100e3 {
		return fmt.Sprintf("%.1f µs", ns/1e3)
	}
	return fmt.Sprintf("%.0f µs", ns/1e3)
}
func kib(b float64) string    { return fmt.Sprintf("%.1f KiB", b/1024) }
func perSec(x float64) string { return thousands(x) + "/s" }
func pct(a, b int) string     { return fmt.Sprintf("%.0f%%", 100*float64(a)/float64(max(b, 1))) }
func ratio(f, m float64) (string, float64) {
	if m == 0 || f == 0 {
		return "–", 0
	}
	return fmt.Sprintf("%.2f×", f/m), f / m
}

// thousands formats x rounded, with thin separators.
func thousands(x float64) string {
	s := fmt.Sprintf("%.0f", x)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// row is one line of the comparison table.
type row struct {
	what         string
	fleet, mosq  float64
	format       func(float64) string
	higherBetter bool
	target       float64 // on fleetmq ÷ mosquitto; 0: none
}

func (r row) cells() []string {
	f, m := "–", "–"
	if r.fleet != 0 {
		f = r.format(r.fleet)
	}
	if r.mosq != 0 {
		m = r.format(r.mosq)
	}
	rs, q := ratio(r.fleet, r.mosq)
	t := ""
	if r.target > 0 {
		op := "≥"
		if !r.higherBetter {
			op = "≤"
		}
		met := "met"
		if q == 0 {
			met = "not measured"
		} else if (r.higherBetter && q < r.target) || (!r.higherBetter && q > r.target) {
			met = "**not met**"
		}
		t = fmt.Sprintf("%s %.1f× — %s", op, r.target, met)
	}
	return []string{r.what, f, m, rs, t}
}

func (res *results) markdown() string {
	c := res.cfg
	f, m := &res.fleet, &res.mosq
	rate := func(r connectResult) float64 { return r.rate }
	p50 := func(r connectResult) float64 { return float64(r.p50) }
	p99 := func(r connectResult) float64 { return float64(r.p99) }
	lp50 := func(r latencyResult) float64 { return float64(r.p50) }
	lp99 := func(r latencyResult) float64 { return float64(r.p99) }
	idle := func(s *side) float64 {
		if s.idle == nil {
			return 0
		}
		return s.idle.perConn()
	}
	rows := []row{
		{fmt.Sprintf("full mTLS connects/s (%d dialers, %d devices)", c.dialers, c.connects),
			median(f.connect, rate), median(m.connect, rate), perSec, true, 2.0},
		{"connect latency p50 (dial → CONNACK)", median(f.connect, p50), median(m.connect, p50), ms, false, 0},
		{"connect latency p99", median(f.connect, p99), median(m.connect, p99), ms, false, 1.0},
		{"full mTLS connects/s, X25519 key exchange on both (see notes)", median(f.connectX, rate), median(m.connectX, rate), perSec, true, 0},
		{"connect latency p99, X25519 key exchange on both", median(f.connectX, p99), median(m.connectX, p99), ms, false, 0},
		{"resumed-session (TLS ticket) reconnects/s", median(f.resume, rate), median(m.resume, rate), perSec, true, 0},
		{"reconnect latency p99", median(f.resume, p99), median(m.resume, p99), ms, false, 0},
		{fmt.Sprintf("QoS 0 msgs/s (%d devices × %d msgs)", c.pubDevices, c.msgs),
			median(f.qos0, id), median(m.qos0, id), perSec, true, 1.0},
		{fmt.Sprintf("QoS 1 msgs/s (%d devices × %d msgs, %d in flight each)", c.pubDevices, c.msgs, c.inflight),
			median(f.qos1, id), median(m.qos1, id), perSec, true, 1.0},
		{fmt.Sprintf("publish → subscriber latency p50 (QoS 1 at %.0f msgs/s)", c.rate),
			median(f.latency, lp50), median(m.latency, lp50), ms, false, 0},
		{"publish → subscriber latency p99", median(f.latency, lp99), median(m.latency, lp99), ms, false, 0},
		{fmt.Sprintf("RSS per idle mTLS connection (%d connections)", c.devices), idle(f), idle(m), kib, false, 1.0},
		{fmt.Sprintf("enrollments/s (%d, %d clients, HTTPS API)", c.devices, c.dialers), res.enrollRate, 0, perSec, true, 0},
	}
	cpuRows := []row{
		{"per full connect", median(f.connectCPU, dur), median(m.connectCPU, dur), us, false, 0},
		{"per full connect, load generator (client side)", median(f.clientCPU, dur), median(m.clientCPU, dur), us, false, 0},
		{"per full connect, X25519 key exchange on both", median(f.connectXCPU, dur), median(m.connectXCPU, dur), us, false, 0},
		{"per full connect, X25519, load generator (client side)", median(f.clientXCPU, dur), median(m.clientXCPU, dur), us, false, 0},
		{"per resumed reconnect", median(f.resumeCPU, dur), median(m.resumeCPU, dur), us, false, 0},
		{"per QoS 0 message", median(f.qos0CPU, dur), median(m.qos0CPU, dur), us, false, 0},
		{"per QoS 1 message", median(f.qos1CPU, dur), median(m.qos1CPU, dur), us, false, 0},
	}

	var b strings.Builder
	fmt.Fprintf(&b, "%s\n## fleetmq vs mosquitto, side by side\n\n", beginMarker)
	fmt.Fprintf(&b, "Written by `scripts/bench.sh` on %s; do not edit by hand between the markers.\n\n", res.start.UTC().Format("2006-01-02 15:04 MST"))
	if c.command != "" {
		fmt.Fprintf(&b, "Command: `%s`\n\n", c.command)
	}
	mc := res.machine
	fmt.Fprintf(&b, "Machine: %d CPUs (%s), Linux %s, load average %s at start (shared machine); %s; %s; %s.\n\n",
		mc.cpus, mc.model, mc.kernel, mc.loadavg, mc.goVer, orUnknown(res.fleetVersion, "fleetmq"), orUnknown(res.mosqVersion, "mosquitto"))
	fmt.Fprintf(&b, "Median of %d rounds; each round runs every scenario on both brokers, alternating which goes first.\n\n", c.rounds)
	writeTable(&b, []string{"", "fleetmq", "mosquitto", "fleetmq ÷ mosquitto", "target"}, rows)
	b.WriteString("\nCPU time (user + system, from /proc) per operation, of the broker unless said otherwise:\n\n")
	writeTable(&b, []string{"", "fleetmq", "mosquitto", "fleetmq ÷ mosquitto", ""}, cpuRows)
	b.WriteString("\nNotes:\n\n")
	b.WriteString("- **fleetmq's QoS 1 PUBACK is sent after the message is committed to disk** (bbolt, fsync, group commit); " +
		"mosquitto's QoS 1 is in memory only (`persistence false`, and mosquitto's persistence is a periodic snapshot anyway).\n")
	if len(f.latency) > 0 {
		b.WriteString("- Publish → subscriber latency: fleetmq forwards QoS 1 telemetry to subscribers from the commit that releases its " +
			"PUBACK, so a subscriber never sees a message the store could still lose, and the latency includes that commit's fsync; " +
			"mosquitto forwards from memory as soon as the message is read.\n")
	}
	if len(f.connect) > 0 && len(m.connect) > 0 {
		fk, mk := f.connect[0].kex, m.connect[0].kex
		fmt.Fprintf(&b, "- Key exchange: the devices (Go's TLS defaults, as the device-agent) offer X25519MLKEM768, the post-quantum "+
			"hybrid, and X25519; fleetmq negotiated %s, mosquitto %s.", fk, mk)
		if fk != mk {
			b.WriteString(" They do different work per handshake (ML-KEM-768 on top of X25519); the \"X25519 key exchange on both\" " +
				"rows have the devices offer X25519 only, so that both do the same. fleetmq's default stays the hybrid.")
		}
		b.WriteString("\n")
	}
	if res.qos0Sent > 0 {
		fmt.Fprintf(&b, "- QoS 0: fleetmq stores QoS 0 telemetry too, asynchronously in batches; when its write queue is full a publisher waits (TCP pushes back) up to 1 s before a message is dropped. %s of %s QoS 0 messages were dropped (`fleetmq_telemetry_rejected_total`); mosquitto stores none.\n",
			thousands(res.qos0Dropped), thousands(res.qos0Sent))
	}
	for _, s := range []struct {
		name string
		rs   []connectResult
	}{{"fleetmq", f.resume}, {"mosquitto", m.resume}} {
		if len(s.rs) > 0 {
			r := s.rs[len(s.rs)-1]
			fmt.Fprintf(&b, "- %s resumed %s of the reconnects' TLS sessions (last round).\n", s.name, pct(r.resumed, r.n))
		}
	}
	for _, s := range []struct {
		name string
		ls   []latencyResult
	}{{"fleetmq", f.latency}, {"mosquitto", m.latency}} {
		for i, l := range s.ls {
			if l.recv != l.sent {
				fmt.Fprintf(&b, "- latency round %d: the subscriber of %s received %d of %d messages.\n", i+1, s.name, l.recv, l.sent)
			}
		}
	}
	for _, s := range []struct {
		name string
		r    *idleResult
	}{{"fleetmq", f.idle}, {"mosquitto", m.idle}} {
		if s.r != nil {
			fmt.Fprintf(&b, "- %s VmRSS %.1f MiB before and %.1f MiB after %d idle connections.\n",
				s.name, float64(s.r.base)/(1<<20), float64(s.r.after)/(1<<20), s.r.n)
		}
	}
	b.WriteString(method)
	b.WriteString(endMarker + "\n")
	return b.String()
}

const method = `
Method (scripts/loadgen, everything on loopback, load generator on the same machine):

- One PKI for both brokers: an ECDSA P-256 CA made for the run, given to fleetmq as its operator CA
  (` + "`--ca-cert/--ca-key`" + `) and to mosquitto as its ` + "`cafile`" + `; ECDSA P-256 server certificates for both.
  Each device has its own key and certificate (CN = client id), obtained from fleetmq's enrollment API
  with a bootstrap token minted by ` + "`fleetmq token create --count N --csv`" + ` (that is the enrollment figure:
  token check, CSR check, signing and the durable commit; CSRs are made before the timer). The same
  certificates are used against mosquitto. The subscriber is a ` + "`fleetmq service issue`" + ` certificate.
- fleetmq runs with its defaults, except the per-device publish rate limit (raised, so that throughput is
  measured and not the limit), the dashboard (off) and a higher connection cap. mosquitto is configured as its
  users would for the job: ` + "`require_certificate true`, `use_identity_as_username true`" + `, ACL
  ` + "`pattern readwrite devices/%u/#`" + ` plus a user line letting the subscriber read ` + "`devices/+/telemetry`" + `,
  ` + "`set_tcp_nodelay true`, `tls_version tlsv1.2`" + ` (minimum), ` + "`persistence false`" + `, logging errors and
  warnings only (fleetmq logs no line per connection either).
- The client is a minimal MQTT 3.1.1 client over Go's crypto/tls with Go's defaults (as the device-agent):
  TLS 1.3 negotiated with both. One write per packet.
- Connects: each device connects once per round (TCP, full TLS handshake with client certificate, CONNECT,
  CONNACK; latency measured from dial to CONNACK), then sends DISCONNECT; once with Go's default key
  exchanges offered, once with X25519 only. Resumed reconnects: a first
  pass gets each device a TLS session ticket, the measured pass resumes it.
- QoS 0 / QoS 1: the publishing devices connect, then each publishes its messages (64-byte JSON) to
  ` + "`devices/{id}/telemetry`" + `. QoS 1 counts a message when its PUBACK is read; QoS 0 counts a device's messages
  when the broker has answered a PINGREQ sent after them.
- Latency: the subscriber subscribes to ` + "`devices/+/telemetry`" + ` at QoS 0; the devices publish QoS 1 at a fixed total
  rate with the send time in the payload.
- Memory: each broker is restarted, VmRSS (/proc/PID/status) is read once settled, every device connects and
  stays idle, and VmRSS is read again once settled (moved < 0.5% over 2 s); the difference is divided by the
  number of connections.
`

func orUnknown(s, what string) string {
	if s == "" {
		return what + " version unknown"
	}
	return s
}

func writeTable(b *strings.Builder, header []string, rows []row) {
	b.WriteString("| " + strings.Join(header, " | ") + " |\n")
	b.WriteString("|" + strings.Repeat(" --- |", len(header)) + "\n")
	for _, r := range rows {
		if r.fleet == 0 && r.mosq == 0 {
			continue
		}
		b.WriteString("| " + strings.Join(r.cells(), " | ") + " |\n")
	}
}

// updateFile replaces the marked section of path with section (which
// carries the markers), or appends it; the rest of the file is kept.
func updateFile(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	out := splice(string(old), section)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(out), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func splice(doc, section string) string {
	i := strings.Index(doc, beginMarker)
	j := strings.Index(doc, endMarker)
	if i >= 0 && j > i {
		rest := doc[j+len(endMarker):]
		rest = strings.TrimPrefix(rest, "\n")
		return doc[:i] + section + rest
	}
	if doc == "" {
		return "# Benchmarks\n\n" + section
	}
	if !strings.HasSuffix(doc, "\n") {
		doc += "\n"
	}
	return doc + "\n" + section
}
