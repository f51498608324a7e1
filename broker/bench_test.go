package broker

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/store"
)

func quietBench(c *Config) {
	c.Logger = zerolog.Nop()
	c.PublishRate = 1e9
	c.PublishBurst = 1 << 30
}

// connectPacket returns an MQTT 3.1.1 CONNECT for id.
func connectPacket(tb testing.TB, id string) []byte {
	tb.Helper()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        60,
			ClientIdentifier: id,
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// mqttConnect dials, sends CONNECT and checks the CONNACK.
func mqttConnect(addr string, cfg *tls.Config, connect []byte) (*tls.Conn, *bufio.Reader, error) {
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return nil, nil, err
	}
	if _, err := c.Write(connect); err != nil {
		c.Close()
		return nil, nil, err
	}
	br := bufio.NewReader(c)
	var ack [4]byte
	if _, err := io.ReadFull(br, ack[:]); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("read CONNACK: %w", err)
	}
	if ack[0] != packets.Connack<<4 || ack[3] != 0 {
		c.Close()
		return nil, nil, fmt.Errorf("CONNACK % x", ack)
	}
	return c, br, nil
}

// BenchmarkConnect measures full mTLS connects (handshake without
// resumption, CONNECT, CONNACK) by 16 concurrent dialers, one certificate
// per dialer, the dialers in the same process.
func BenchmarkConnect(b *testing.B) {
	f := newFixture(b, quietBench)
	const dialers = 16
	procs := runtime.GOMAXPROCS(0)
	par := (dialers + procs - 1) / procs
	type dialer struct {
		cfg     *tls.Config
		connect []byte
	}
	ds := make([]dialer, par*procs)
	for i := range ds {
		id := fmt.Sprintf("bench-%d", i)
		ds[i] = dialer{cfg: f.clientTLS(f.device(b, id)), connect: connectPacket(b, id)}
	}
	disconnect := []byte{packets.Disconnect << 4, 0}
	var next atomic.Int64
	b.SetParallelism(par)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		d := ds[next.Add(1)-1]
		for pb.Next() {
			c, _, err := mqttConnect(f.addr, d.cfg, d.connect)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = c.Write(disconnect)
			_ = c.Close()
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "connects/s")
}

// appendPublish appends an MQTT 3.1.1 QoS 1 PUBLISH.
func appendPublish(buf []byte, topic string, id uint16, payload []byte) []byte {
	n := 2 + len(topic) + 2 + len(payload)
	buf = append(buf, packets.Publish<<4|1<<1)
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		buf = append(buf, b)
		if n == 0 {
			break
		}
	}
	buf = append(buf, byte(len(topic)>>8), byte(len(topic)))
	buf = append(buf, topic...)
	buf = append(buf, byte(id>>8), byte(id))
	return append(buf, payload...)
}

// BenchmarkQoS1Publish measures durable QoS 1 telemetry: 50 devices publish
// concurrently, each keeping up to 32 messages unacknowledged; a message
// counts once its PUBACK, sent after the commit, is read.
func BenchmarkQoS1Publish(b *testing.B) {
	var commitTime atomic.Int64
	f := newFixtureStore(b, quietBench, func(db *store.DB) Store { return &timedStore{DB: db, total: &commitTime} })
	const (
		devices = 50
		window  = 32
	)
	payload := []byte(`{"temp":21.5,"humidity":40.25,"battery":3.71,"uptime":123456}`)
	type pub struct {
		c     *tls.Conn
		br    *bufio.Reader
		topic string
	}
	pubs := make([]pub, devices)
	for i := range pubs {
		id := fmt.Sprintf("bench-%d", i)
		c, br, err := mqttConnect(f.addr, f.clientTLS(f.device(b, id)), connectPacket(b, id))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = c.Close() })
		pubs[i] = pub{c: c, br: br, topic: "devices/" + id + "/telemetry"}
	}
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, p := range pubs {
		n := b.N / devices
		if i < b.N%devices {
			n++
		}
		if n == 0 {
			continue
		}
		slots := make(chan struct{}, window)
		wg.Add(2)
		go func() { // writer
			defer wg.Done()
			var buf []byte
			for k := range n {
				slots <- struct{}{}
				buf = appendPublish(buf[:0], p.topic, uint16(k%65535+1), payload)
				if _, err := p.c.Write(buf); err != nil {
					b.Error(err)
					return
				}
			}
		}()
		go func() { // PUBACK reader
			defer wg.Done()
			var ack [4]byte
			for range n {
				if _, err := io.ReadFull(p.br, ack[:]); err != nil {
					b.Error(err)
					return
				}
				if ack[0] != packets.Puback<<4 {
					b.Errorf("got % x, want a PUBACK", ack)
					return
				}
				<-slots
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
	s := f.b.Stats()
	if s.TelemetryStored < uint64(b.N) {
		b.Fatalf("stored %d of %d", s.TelemetryStored, b.N)
	}
	b.ReportMetric(float64(s.TelemetryStored)/float64(s.TelemetryCommits), "msgs/commit")
	b.ReportMetric(float64(commitTime.Load())/1e6/float64(s.TelemetryCommits), "ms/commit")
}

// timedStore adds up the time spent in AppendTelemetry.
type timedStore struct {
	*store.DB
	total *atomic.Int64
}

func (t *timedStore) AppendTelemetry(ctx context.Context, msgs []store.Message) error {
	start := time.Now()
	err := t.DB.AppendTelemetry(ctx, msgs)
	t.total.Add(int64(time.Since(start)))
	return err
}
