package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// connectResult is one pass of connects.
type connectResult struct {
	rate    float64 // connects per second
	p50     time.Duration
	p99     time.Duration
	resumed int // handshakes that resumed a TLS session
	n       int
	kex     tls.CurveID // key exchange of the first connection
}

// runConnects connects each device once from dialers concurrent dialers:
// TCP, TLS handshake, CONNECT, CONNACK (the latency measured), then
// DISCONNECT. caches, when not nil, holds each device's TLS session cache;
// curves, when not nil, are the only key exchanges the devices offer.
func runConnects(addr string, devs []*device, roots *x509.CertPool, dialers int, caches []tls.ClientSessionCache, curves []tls.CurveID) (connectResult, error) {
	cfgs := make([]*tls.Config, len(devs))
	for i, d := range devs {
		var cache tls.ClientSessionCache
		if caches != nil {
			cache = caches[i]
		}
		cfgs[i] = d.tlsConfig(roots, cache)
		cfgs[i].CurvePreferences = curves
	}
	lats := make([]time.Duration, len(devs))
	kex := make([]tls.CurveID, len(devs))
	var next atomic.Int64
	var resumed atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, dialers)
	start := time.Now()
	for range dialers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(devs) {
					return
				}
				t0 := time.Now()
				c, err := dialMQTT(addr, cfgs[i], devs[i].id, 60)
				if err != nil {
					errs <- fmt.Errorf("connect %s: %w", devs[i].id, err)
					return
				}
				lats[i] = time.Since(t0)
				cs := c.tc.ConnectionState()
				kex[i] = cs.CurveID
				if cs.DidResume {
					resumed.Add(1)
				}
				c.disconnect()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return connectResult{}, err
	}
	slices.Sort(lats)
	return connectResult{
		rate:    float64(len(devs)) / elapsed.Seconds(),
		p50:     percentile(lats, 0.50),
		p99:     percentile(lats, 0.99),
		resumed: int(resumed.Load()),
		n:       len(devs),
		kex:     kex[0],
	}, nil
}

func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// telemetryPayload is a typical small JSON reading, 64 bytes.
var telemetryPayload = []byte(`{"temp":21.50,"humidity":40.25,"battery":3.71,"uptime":12345678}`)

// connectAll opens one connection per device, dialers at a time, and keeps
// them open.
func connectAll(addr string, devs []*device, roots *x509.CertPool, dialers int, keepalive uint16) ([]*mqttConn, error) {
	conns := make([]*mqttConn, len(devs))
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, dialers)
	for range dialers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(devs) {
					return
				}
				c, err := dialMQTT(addr, devs[i].tlsConfig(roots, nil), devs[i].id, keepalive)
				if err != nil {
					errs <- fmt.Errorf("connect %s: %w", devs[i].id, err)
					return
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []*mqttConn) {
	for _, c := range conns {
		if c != nil {
			c.disconnect()
		}
	}
}

// runThroughput has every device publish msgs telemetry messages at qos
// and returns the messages per second. At QoS 1 each device keeps up to
// inflight messages unacknowledged, and a message counts once its PUBACK
// is read. At QoS 0 a device's messages count once the broker has answered
// a PINGREQ sent after them: it handles a connection's packets in order.
func runThroughput(addr string, devs []*device, roots *x509.CertPool, qos byte, msgs, inflight int) (float64, error) {
	conns, err := connectAll(addr, devs, roots, 16, 60)
	if err != nil {
		return 0, err
	}
	defer closeAll(conns)
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(conns))
	start := time.Now()
	for i, c := range conns {
		topic := "devices/" + devs[i].id + "/telemetry"
		if qos == 0 {
			wg.Go(func() {
				for range msgs {
					if err := c.publish(topic, 0, 0, telemetryPayload); err != nil {
						errs <- err
						return
					}
				}
				if err := c.ping(); err != nil {
					errs <- err
				}
			})
			continue
		}
		slots := make(chan struct{}, inflight)
		failed := make(chan struct{})
		wg.Go(func() { // publisher
			for k := range msgs {
				select {
				case slots <- struct{}{}:
				case <-failed:
					return
				}
				if err := c.publish(topic, 1, uint16(k%65535+1), telemetryPayload); err != nil {
					errs <- err
					return
				}
			}
		})
		wg.Go(func() { // PUBACK reader
			defer close(failed)
			for n := 0; n < msgs; {
				typ, _, _, err := c.readPacket()
				if err != nil {
					errs <- fmt.Errorf("%s: read PUBACK after %d: %w", topic, n, err)
					return
				}
				if typ == pktPuback {
					n++
					<-slots
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(len(conns)*msgs) / elapsed.Seconds(), nil
}

// latencyResult is publish→subscriber latency at a fixed rate.
type latencyResult struct {
	p50, p99   time.Duration
	sent, recv int
}

// runLatency has the devices publish QoS 1 telemetry at rate messages per
// second in all for dur, each message carrying its send time, and measures
// when the subscriber, subscribed to devices/+/telemetry at QoS 0,
// receives it.
func runLatency(addr string, devs []*device, roots *x509.CertPool, sub tls.Certificate, subID string, rate float64, dur time.Duration) (latencyResult, error) {
	subCfg := &tls.Config{Certificates: []tls.Certificate{sub}, RootCAs: roots, ServerName: "127.0.0.1"}
	sc, err := dialMQTT(addr, subCfg, subID, 60)
	if err != nil {
		return latencyResult{}, fmt.Errorf("subscriber: %w", err)
	}
	defer sc.disconnect()
	if err := sc.subscribe("devices/+/telemetry", 0); err != nil {
		return latencyResult{}, err
	}
	conns, err := connectAll(addr, devs, roots, 16, 60)
	if err != nil {
		return latencyResult{}, err
	}

	perDev := int(rate * dur.Seconds() / float64(len(conns)))
	total := perDev * len(conns)
	lats := make([]time.Duration, 0, total)
	recvDone := make(chan error, 1)
	go func() {
		for len(lats) < total {
			typ, flags, body, err := sc.readPacket()
			if err != nil {
				recvDone <- err
				return
			}
			if typ != pktPublish {
				continue
			}
			_, payload, err := parsePublish(flags, body)
			if err != nil || len(payload) < 8 {
				recvDone <- errors.New("subscriber: malformed PUBLISH")
				return
			}
			sent := int64(binary.BigEndian.Uint64(payload))
			lats = append(lats, time.Duration(time.Now().UnixNano()-sent))
		}
		recvDone <- nil
	}()

	interval := time.Duration(float64(len(conns)) / rate * float64(time.Second))
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(conns))
	for i, c := range conns {
		topic := "devices/" + devs[i].id + "/telemetry"
		wg.Go(func() { // PUBACKs are read and dropped
			for {
				if _, _, _, err := c.readPacket(); err != nil {
					return
				}
			}
		})
		offset := interval * time.Duration(i) / time.Duration(len(conns))
		wg.Go(func() {
			payload := slices.Clone(telemetryPayload)
			t := time.NewTimer(offset)
			next := time.Now().Add(offset)
			for k := range perDev {
				<-t.C
				binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
				if err := c.publish(topic, 1, uint16(k%65535+1), payload); err != nil {
					errs <- err
					return
				}
				next = next.Add(interval)
				t.Reset(time.Until(next))
			}
			t.Stop()
		})
	}
	var rerr error
	select {
	case rerr = <-recvDone:
	case <-time.After(dur + 10*time.Second):
		// Messages lost or late: closing ends the reader.
		_ = sc.close()
		rerr = <-recvDone
	}
	// Publishers end after perDev messages, PUBACK readers when their
	// connection closes.
	closeAll(conns)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return latencyResult{}, err
	}
	if rerr != nil && len(lats) == 0 {
		return latencyResult{}, fmt.Errorf("subscriber: %w", rerr)
	}
	slices.Sort(lats)
	return latencyResult{p50: percentile(lats, 0.5), p99: percentile(lats, 0.99), sent: total, recv: len(lats)}, nil
}

// idleResult is the broker's resident memory around n idle connections.
type idleResult struct {
	n           int
	base, after uint64 // VmRSS bytes
}

func (r idleResult) perConn() float64 { return (float64(r.after) - float64(r.base)) / float64(r.n) }

// runIdle measures pid's resident memory, opens one idle connection per
// device, waits until the resident memory has settled and measures again;
// then it calls settled, if not nil, before closing the connections.
func runIdle(pid int, addr string, devs []*device, roots *x509.CertPool, dialers int, settled func()) (idleResult, error) {
	base, err := settledRSS(pid)
	if err != nil {
		return idleResult{}, err
	}
	conns, err := connectAll(addr, devs, roots, dialers, 300)
	if err != nil {
		return idleResult{}, err
	}
	defer closeAll(conns)
	after, err := settledRSS(pid)
	if err != nil {
		return idleResult{}, err
	}
	if settled != nil {
		settled()
	}
	return idleResult{n: len(devs), base: base, after: after}, nil
}

// settledRSS samples VmRSS every 250 ms until it has moved less than 0.5%
// over 2 s (at most 15 s), and returns the last sample.
func settledRSS(pid int) (uint64, error) {
	var samples []uint64
	deadline := time.Now().Add(15 * time.Second)
	for {
		v, err := procRSS(pid)
		if err != nil {
			return 0, err
		}
		samples = append(samples, v)
		if n := len(samples); n >= 9 {
			w := samples[n-9:]
			lo, hi := slices.Min(w), slices.Max(w)
			if float64(hi-lo) <= 0.005*float64(hi) || time.Now().After(deadline) {
				return v, nil
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
}
