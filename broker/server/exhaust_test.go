package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/broker"
	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/store"
)

// needFDs makes sure this process may open n files, raising the soft limit
// up to the hard one; a machine whose hard limit is lower cannot run the test.
func needFDs(tb testing.TB, n uint64) {
	tb.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		tb.Skipf("needs %d file descriptors; the hard limit is %d", n, lim.Max)
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatalf("raise the file descriptor limit: %v", err)
	}
}

// TestHandshakeFlood opens 2,000 sockets that never finish a TLS handshake
// (half silent, half stopping inside their ClientHello). Real devices still
// connect and publish while they hang, and the server closes every one of
// them at the handshake deadline. The flood comes from ten loopback
// addresses other than the devices' 127.0.0.1, each under the default
// --max-pending-per-address (256), so that every socket is held until the
// deadline rather than refused at once.
func TestHandshakeFlood(t *testing.T) {
	const flood, deadline, devices = 2000, 6 * time.Second, 5
	needFDs(t, 2*flood+500)
	s := startServer(t, func(c *server.Config) { c.Broker.HandshakeTimeout = deadline })
	devs := make([]*device, devices)
	for i := range devs {
		devs[i] = s.identity(t, fmt.Sprintf("flood-dev-%d", i), store.RoleDevice)
	}
	addr := s.MQTTAddr().String()

	type socket struct {
		c      net.Conn
		dialed time.Time
	}
	socks := make([]socket, 0, flood)
	// A TLS record header announcing 512 bytes of handshake, then the
	// start of a ClientHello, and nothing more.
	partialHello := []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03}
	for i := range flood {
		from := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(10+i%10))}
		c, err := (&net.Dialer{LocalAddr: from, Timeout: 10 * time.Second}).Dial("tcp", addr)
		if err != nil {
			t.Fatalf("flood socket %d: %v", i, err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if i%2 == 1 {
			if _, err := c.Write(partialHello); err != nil {
				t.Fatal(err)
			}
		}
		socks = append(socks, socket{c, time.Now()})
	}
	floodDone := time.Now()

	// Each flood socket waits for the server to close it.
	closedAt := make([]time.Time, flood)
	var readers sync.WaitGroup
	for i, sk := range socks {
		readers.Add(1)
		go func() {
			defer readers.Done()
			_ = sk.c.SetReadDeadline(time.Now().Add(deadline + 60*time.Second))
			_, err := sk.c.Read(make([]byte, 64))
			var ne net.Error
			if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
				closedAt[i] = time.Now()
			}
		}()
	}

	// Real devices, meanwhile.
	var connected time.Time
	if err := parallel(devices, devices, func(i int) error {
		c, err := dialQoS1(addr, s.mqttTLS(devs[i]), devs[i].cert.Subject.CommonName, 30)
		if err != nil {
			return err
		}
		defer c.close()
		return c.publish("devices/"+c.id+"/telemetry", []byte(`{"during":"flood"}`))
	}); err != nil {
		t.Fatalf("a device could not connect during the flood: %v", err)
	}
	connected = time.Now()
	readers.Wait()

	first := time.Time{}
	for i, at := range closedAt {
		if at.IsZero() {
			t.Fatalf("flood socket %d still open %s after the handshake deadline", i, 60*time.Second)
		}
		if took := at.Sub(socks[i].dialed); took < deadline-time.Second || took > deadline+30*time.Second {
			t.Errorf("flood socket %d closed after %s, want about %s", i, took, deadline)
		}
		if first.IsZero() || at.Before(first) {
			first = at
		}
	}
	if !connected.Before(first) {
		t.Errorf("devices got through only after the flood was closed (devices %s, first close %s after the flood)",
			connected.Sub(floodDone), first.Sub(floodDone))
	}
	eventually(t, func() bool {
		st := s.Broker().Stats()
		return st.HandshakeFailures[broker.ReasonTimeout] >= flood && st.OpenConnections == 0
	}, "the flood counted as handshake timeouts and every socket closed")
	t.Logf("devices connected %s after the flood began; sockets closed %s after it", connected.Sub(floodDone), first.Sub(floodDone))
}

// eventually waits up to 30s for cond.
func eventually(tb testing.TB, cond func() bool, what string) {
	tb.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			tb.Fatalf("timed out waiting: %s", what)
		}
	}
}

// TestFileDescriptorExhaustion runs the fleetmq binary with a low file
// descriptor limit (prlimit). A flood of MQTT sockets that never handshake
// gets only the connections the limit leaves after a reserve: the rest are
// refused as over the limit, and the admin socket and the enrollment
// endpoint keep answering (QA: with every descriptor taken by the broker,
// `fleetmq device list` hung for as long as the flood lasted). Holding the
// enrollment endpoint too then drives the process out of descriptors; once
// the sockets close, the MQTT and HTTPS listeners recover by themselves and
// a device connects and publishes.
func TestFileDescriptorExhaustion(t *testing.T) {
	const limit = 64
	n := startNodeWithFDs(t, limit, "--handshake-timeout", "2m")
	d := n.device("fd-")
	id := d.resp.DeviceID
	pool := n.ca()
	cfg := deviceTLS(pool, d)
	if !strings.Contains(n.logs.String(), "accepting at most 32 MQTT connections") {
		t.Errorf("no warning at start that the open file limit caps the connections:\n%s", n.logs.String())
	}

	var flood []net.Conn
	t.Cleanup(func() {
		for _, c := range flood {
			_ = c.Close()
		}
	})
	dialFlood := func(addr string, count int) {
		for range count {
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				t.Fatalf("flood: %v", err)
			}
			flood = append(flood, c)
		}
	}
	dialFlood(n.mqttAddr, 2*limit)
	eventually(t, func() bool {
		return strings.Contains(n.logs.String(), "the connection limit is reached")
	}, "the broker at its connection limit")

	// At the cap, the broker cannot take a device.
	tryDevice := func(timeout time.Duration) error {
		d := net.Dialer{Timeout: timeout}
		conn, err := tls.DialWithDialer(&d, "tcp", n.mqttAddr, cfg)
		if err != nil {
			return err
		}
		conn.Close()
		return nil
	}
	if err := tryDevice(2 * time.Second); err == nil {
		t.Fatal("a device got through beyond the connection cap")
	}
	// The operator and enrollment still get in.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := n.admin().Devices(ctx); err != nil {
		t.Fatalf("admin socket during the MQTT flood: %v", err)
	}
	getCA := func() error {
		resp, err := n.httpsClient().Get("https://" + n.enrollAddr + "/v1/ca")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("GET /v1/ca: %d", resp.StatusCode)
		}
		return nil
	}
	if err := getCA(); err != nil {
		t.Fatalf("enrollment endpoint during the MQTT flood: %v", err)
	}

	// Sockets held on the enrollment port take the reserve: now the
	// process is out of descriptors.
	dialFlood(n.enrollAddr, limit)
	eventually(t, func() bool {
		_ = tryDevice(500 * time.Millisecond)
		return strings.Contains(n.logs.String(), `broker: accept failed`) &&
			strings.Contains(n.logs.String(), "too many open files")
	}, "the broker out of file descriptors")

	// Relief.
	for _, c := range flood {
		_ = c.Close()
	}
	var c *qos1Client
	var err error
	retryUntil := time.Now().Add(60 * time.Second)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for c == nil {
		if time.Now().After(retryUntil) {
			t.Fatalf("no device could connect within a minute of the relief: %v", err)
		}
		<-tick.C
		c, err = dialQoS1(n.mqttAddr, cfg, id, 30)
	}
	defer c.close()
	if err := c.publish("devices/"+id+"/telemetry", []byte(`{"after":"relief"}`)); err != nil {
		t.Fatalf("publish after the relief: %v", err)
	}
	if err := getCA(); err != nil {
		t.Fatalf("enrollment endpoint after the relief: %v", err)
	}
	c.close()
	n.stop()
}

// TestSlowSubscriberDoesNotSlowOthers subscribes a device that then stops
// reading, floods its command topic, and checks that another device's
// commands still arrive promptly, that the broker keeps only a bounded
// backlog for the stalled one, and that its memory stays bounded.
func TestSlowSubscriberDoesNotSlowOthers(t *testing.T) {
	const (
		flood   = 20_000
		payload = 8 << 10
		every   = 500 // one command to the fast device per this many flood messages
	)
	s := startServer(t, func(c *server.Config) {
		c.Broker.PublishRate, c.Broker.PublishBurst = 1e6, 1_000_000
	})
	slow := s.identity(t, "slow", store.RoleDevice)
	fast := s.identity(t, "fast", store.RoleDevice)
	backend := s.identity(t, "backend", store.RoleService)
	addr := s.MQTTAddr().String()

	// The slow device subscribes with a tiny receive buffer, then never reads.
	cfg := s.mqttTLS(slow)
	dialer := &net.Dialer{Timeout: 10 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	conn, err := tls.DialWithDialer(dialer, "tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	sr := &rawMQTT{tb: t, conn: conn, br: bufio.NewReader(conn)}
	if code := sr.connect("slow", 600); code != 0 {
		t.Fatalf("slow CONNACK %d", code)
	}
	sr.send(subscribePacket(1, "devices/slow/commands/#", 1))
	if typ, body, err := sr.read(10 * time.Second); err != nil || typ != packets.Suback || body[2] != 1 {
		t.Fatalf("slow SUBACK: %d %x %v", typ, body, err)
	}

	arrived := make(chan string, flood/every+10)
	fc := pahoClient(t, s, fast, "fast", nil)
	defer fc.Disconnect(0)
	if tok := fc.Subscribe("devices/fast/commands/#", 0, func(_ paho.Client, m paho.Message) { arrived <- string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("fast subscribe: %v", tok.Error())
	}

	pub := dialMQTT(t, addr, s.mqttTLS(backend))
	if code := pub.connect("backend", 600); code != 0 {
		t.Fatalf("backend CONNACK %d", code)
	}

	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	baseline := ms.HeapInuse
	var peak atomic.Uint64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
		}
	}()

	body := strings.Repeat("x", payload)
	sentAt := map[string]time.Time{}
	var latencies []time.Duration
	start := time.Now()
	for i := range flood {
		pub.send(publishPacket(0, "devices/slow/commands/flood", 0, body))
		if i%every == every-1 {
			ping := strconv.Itoa(i)
			sentAt[ping] = time.Now()
			pub.send(publishPacket(0, "devices/fast/commands/ping", 0, ping))
		}
		// Collect what has arrived, without waiting.
		for len(arrived) > 0 {
			p := <-arrived
			latencies = append(latencies, time.Since(sentAt[p]))
		}
	}
	floodTook := time.Since(start)
	for len(latencies) < flood/every {
		select {
		case p := <-arrived:
			latencies = append(latencies, time.Since(sentAt[p]))
		case <-time.After(10 * time.Second):
			t.Fatalf("the fast device received %d of %d commands", len(latencies), flood/every)
		}
	}
	close(stopSampling)
	<-sampled
	// What the broker still holds for the stalled device, which has not
	// read a byte: live heap after a collection.
	runtime.GC()
	runtime.ReadMemStats(&ms)
	held := int64(ms.HeapInuse) - int64(baseline)
	var worst time.Duration
	for _, l := range latencies {
		worst = max(worst, l)
	}
	t.Logf("flooded %d MiB in %s; fast device's worst command latency %s; heap %+d MiB at peak, %+d MiB live after the flood",
		flood*payload>>20, floodTook.Round(time.Millisecond), worst.Round(time.Millisecond), (int64(peak.Load())-int64(baseline))>>20, held>>20)
	// Bounds with room for a loaded machine: a broker blocked on the
	// stalled reader would hold the fast device's commands until the
	// flood ends, and one buffering for it would keep the flood's size.
	if worst > 3*time.Second {
		t.Errorf("a command to the fast device took %s", worst)
	}
	if held > 32<<20 {
		t.Errorf("the broker holds %d MiB more after flooding %d MiB at a stalled subscriber", held>>20, flood*payload>>20)
	}

	// What reached the stalled device is bounded by the write queue and the
	// socket buffers, far short of the flood.
	got := 0
	for {
		typ, _, err := sr.read(2 * time.Second)
		if err != nil {
			break
		}
		if typ == packets.Publish {
			got++
		}
	}
	t.Logf("the stalled device had %d of %d messages waiting", got, flood)
	if got >= flood/2 {
		t.Errorf("the stalled device was sent %d of %d messages: nothing was dropped for it", got, flood)
	}
}

// soakDuration is how long TestSoak publishes: FLEETMQ_SOAK (a Go
// duration) if set, else 10s with -short and 60s otherwise.
func soakDuration(tb testing.TB) time.Duration {
	tb.Helper()
	if v := os.Getenv("FLEETMQ_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			tb.Fatalf("FLEETMQ_SOAK=%q is not a positive duration", v)
		}
		return d
	}
	if testing.Short() {
		return 10 * time.Second
	}
	return 60 * time.Second
}

// rssOf returns the resident memory of process pid, in bytes.
func rssOf(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// TestSoak connects 2,000 devices to the fleetmq binary, each publishing one
// QoS 1 message a second for soakDuration: every message is acknowledged
// and stored, and the server's resident memory stays flat.
func TestSoak(t *testing.T) {
	const devices = 2000
	needFDs(t, 2*devices+500)
	soak := soakDuration(t)
	bin := buildFleetmq(t)
	data := filepath.Join(t.TempDir(), "data")
	n := startNode(t, bin, data, nil)
	pool := n.ca()

	setup := time.Now()
	toks := n.tokens(devices, "soak-")
	hc := n.httpsClient()
	devs := make([]*device, devices)
	if err := parallel(devices, 16, func(i int) error {
		d, err := enrollOver(hc, n.enrollAddr, toks[i].Secret, "")
		devs[i] = d
		return err
	}); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	clients := make([]*qos1Client, devices)
	if err := parallel(devices, 16, func(i int) error {
		c, err := dialQoS1(n.mqttAddr, deviceTLS(pool, devs[i]), devs[i].resp.DeviceID, 60)
		clients[i] = c
		return err
	}); err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Logf("%d devices enrolled and connected in %s", devices, time.Since(setup).Round(time.Millisecond))
	rss0, err := rssOf(n.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}

	acked := make([]int, devices)
	failed := make([]error, devices)
	var slowest atomic.Int64
	end := time.Now().Add(soak)
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "devices/" + c.id + "/telemetry"
			// Spread the devices over the second.
			first := time.NewTimer(time.Duration(rand.Int64N(int64(time.Second))))
			<-first.C
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for k := 0; time.Now().Before(end); k++ {
				sent := time.Now()
				if err := c.publish(topic, fmt.Appendf(nil, `{"n":%d}`, k)); err != nil {
					failed[i] = fmt.Errorf("message %d: %w", k, err)
					return
				}
				acked[i]++
				if took := int64(time.Since(sent)); took > slowest.Load() {
					slowest.Store(took)
				}
				<-tick.C
			}
		}()
	}

	// Sample the server's memory while the devices publish.
	var samples []uint64
	sample := time.NewTicker(soak / 20)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
sampling:
	for {
		select {
		case <-done:
			break sampling
		case <-sample.C:
			if rss, err := rssOf(n.cmd.Process.Pid); err == nil {
				samples = append(samples, rss)
			}
		}
	}
	sample.Stop()
	for _, c := range clients {
		c.close()
	}
	total := 0
	for i, err := range failed {
		if err != nil {
			t.Errorf("%s: %v", devs[i].resp.DeviceID, err)
		}
		total += acked[i]
	}
	if t.Failed() {
		t.FailNow()
	}

	// Nothing lost: every acknowledged message is stored.
	lost := 0
	for i, d := range devs {
		stored := n.storedNumbers(d.resp.DeviceID)
		for k := range acked[i] {
			if !stored[k] {
				lost++
			}
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d acknowledged messages are not stored", lost, total)
	}
	if want := int(soak/time.Second) * devices * 3 / 4; total < want {
		t.Errorf("%d messages acknowledged in %s, want at least %d (one a second per device)", total, soak, want)
	}

	// Memory flat: the last quarter of the samples is no higher than the
	// first quarter, give or take 25% and 32 MiB of allocator noise.
	if len(samples) < 8 {
		t.Fatalf("only %d memory samples", len(samples))
	}
	q := len(samples) / 4
	maxOf := func(s []uint64) uint64 {
		var m uint64
		for _, v := range s {
			m = max(m, v)
		}
		return m
	}
	early, late := maxOf(samples[:q]), maxOf(samples[len(samples)-q:])
	mib := make([]uint64, len(samples))
	for i, v := range samples {
		mib[i] = v >> 20
	}
	t.Logf("soak %s: %d messages from %d devices, slowest PUBACK %s; server RSS %d MiB connected, %d MiB early, %d MiB late; samples (MiB) %v",
		soak, total, devices, time.Duration(slowest.Load()).Round(time.Millisecond), rss0>>20, early>>20, late>>20, mib)
	if late > early+early/4+32<<20 {
		t.Errorf("server memory grew from %d MiB to %d MiB during the soak", early>>20, late>>20)
	}
	n.stop()
}

// TestIdleHTTPConnectionsCannotStarveDevices runs the fleetmq binary with
// a low file descriptor limit and holds many kept-alive connections to the
// metrics listener after one request each (a scraper left hanging, or a
// flood where metrics is reachable): they are capped, so the broker and
// the enrollment endpoint keep their descriptors.
func TestIdleHTTPConnectionsCannotStarveDevices(t *testing.T) {
	const limit = 128
	n := startNodeWithFDs(t, limit, "--metrics-addr", "127.0.0.1:0")
	d := n.device("idle-")
	metricsAddr := strings.TrimSuffix(strings.TrimPrefix(n.metricsURL, "http://"), "/metrics")

	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			_ = c.Close()
		}
	})
	for range 2 * limit {
		c, err := net.DialTimeout("tcp", metricsAddr, 10*time.Second)
		if err != nil {
			t.Fatalf("dial metrics: %v", err)
		}
		held = append(held, c)
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatalf("request: %v", err)
		}
	}
	// The first ones are answered and then idle, kept alive.
	for _, c := range held[:8] {
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("healthz on a held connection: %v", err)
		}
		resp.Body.Close()
	}

	c, err := dialQoS1(n.mqttAddr, deviceTLS(n.ca(), d), d.resp.DeviceID, 30)
	if err != nil {
		t.Fatalf("a device cannot connect while metrics connections are held: %v", err)
	}
	defer c.close()
	if err := c.publish("devices/"+d.resp.DeviceID+"/telemetry", []byte(`{"ok":1}`)); err != nil {
		t.Fatalf("publish: %v", err)
	}
	resp, err := n.httpsClient().Get("https://" + n.enrollAddr + "/v1/ca")
	if err != nil {
		t.Fatalf("enrollment endpoint while metrics connections are held: %v", err)
	}
	resp.Body.Close()
	if strings.Contains(n.logs.String(), "too many open files") {
		t.Errorf("the node ran out of descriptors:\n%s", n.logs.String())
	}
	c.close()
	n.stop()
}
