package server_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// checkStoreFile opens the database of a stopped node and runs bbolt's
// consistency check on it.
func checkStoreFile(tb testing.TB, data string) *store.DB {
	tb.Helper()
	db, err := store.Open(filepath.Join(data, server.DBName), store.Options{})
	if err != nil {
		tb.Fatalf("open the store after the crash: %v", err)
	}
	tb.Cleanup(func() { _ = db.Close() })
	if err := db.Check(); err != nil {
		tb.Fatalf("store after the crash: %v", err)
	}
	return db
}

// TestCrashDuringTelemetry: 50 devices publish numbered QoS 1 telemetry to
// the fleetmq binary, which is killed with SIGKILL mid-stream. After a
// restart on the same data folder every acknowledged message is stored, the
// file passes bbolt's check, and every device reconnects.
func TestCrashDuringTelemetry(t *testing.T) {
	bin := buildFleetmq(t)
	data := filepath.Join(t.TempDir(), "data")
	n := startNode(t, bin, data, nil, "--publish-rate", "10000", "--publish-burst", "10000")
	const devices, killAfter = 50, 3000

	toks := n.tokens(devices, "crash-")
	hc := n.httpsClient()
	devs := make([]*device, devices)
	if err := parallel(devices, 8, func(i int) error {
		d, err := enrollOver(hc, n.enrollAddr, toks[i].Secret, "")
		devs[i] = d
		return err
	}); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	pool := n.ca()

	clients := make([]*qos1Client, devices)
	if err := parallel(devices, 8, func(i int) error {
		c, err := dialQoS1(n.mqttAddr, deviceTLS(pool, devs[i]), devs[i].resp.DeviceID, 30)
		clients[i] = c
		return err
	}); err != nil {
		t.Fatalf("connect: %v", err)
	}

	// Each device publishes {"n":0}, {"n":1}, … one at a time, and records
	// the numbers the broker acknowledged, until its connection dies.
	acked := make([][]int, devices)
	var total atomic.Int64
	reached := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.close()
			topic := "devices/" + c.id + "/telemetry"
			for k := range 1_000_000 {
				if err := c.publish(topic, fmt.Appendf(nil, `{"n":%d}`, k)); err != nil {
					return
				}
				acked[i] = append(acked[i], k)
				if total.Add(1) == killAfter {
					once.Do(func() { close(reached) })
				}
			}
		}()
	}
	select {
	case <-reached:
	case <-time.After(3 * time.Minute):
		n.kill()
		wg.Wait()
		t.Fatalf("only %d messages acknowledged in 3 minutes", total.Load())
	}
	n.kill()
	wg.Wait()
	t.Logf("killed after %d acknowledged messages", total.Load())

	db := checkStoreFile(t, data)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	n2 := startNode(t, bin, data, nil, "--publish-rate", "10000", "--publish-burst", "10000")
	lost := 0
	for i, d := range devs {
		stored := n2.storedNumbers(d.resp.DeviceID)
		for _, k := range acked[i] {
			if !stored[k] {
				lost++
				if lost <= 10 {
					t.Errorf("%s: message %d was acknowledged but is not stored", d.resp.DeviceID, k)
				}
			}
		}
		if extra := len(stored) - len(acked[i]); extra < 0 || extra > 1 {
			// At most the one publish in flight at the kill may be
			// stored without its PUBACK having arrived.
			t.Errorf("%s: %d stored, %d acknowledged", d.resp.DeviceID, len(stored), len(acked[i]))
		}
	}
	if lost > 0 {
		t.Fatalf("%d acknowledged messages lost", lost)
	}

	// Every device reconnects to the restarted node and is acknowledged.
	if err := parallel(devices, 8, func(i int) error {
		c, err := dialQoS1(n2.mqttAddr, deviceTLS(pool, devs[i]), devs[i].resp.DeviceID, 30)
		if err != nil {
			return fmt.Errorf("%s reconnects: %w", devs[i].resp.DeviceID, err)
		}
		defer c.close()
		return c.publish("devices/"+c.id+"/telemetry", []byte(`{"n":-1}`))
	}); err != nil {
		t.Fatal(err)
	}
	n2.stop()
	checkStoreFile(t, data)
}

// TestCrashDuringEnrollment kills the fleetmq binary during a burst of
// concurrent enrollments, two devices racing for each single-use token.
// Every certificate that was handed out is recorded with its device, and no
// token was spent twice.
func TestCrashDuringEnrollment(t *testing.T) {
	bin := buildFleetmq(t)
	data := filepath.Join(t.TempDir(), "data")
	n := startNode(t, bin, data, nil)
	const tokens, killAfter = 150, 50
	toks := n.tokens(tokens, "")
	pool := n.ca()

	// Each request comes from its own loopback address, so the losers of
	// the races do not get the whole burst rate limited.
	clientFrom := func(i int) *http.Client {
		d := &net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, byte(1+i/250), byte(2+i%250))}}
		return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			DialContext:       d.DialContext,
			TLSClientConfig:   &tls.Config{RootCAs: pool},
			DisableKeepAlives: true,
		}}
	}
	type issued struct {
		token int
		id    string
		d     *device
	}
	var (
		mu      sync.Mutex
		got     []issued
		refused int
		broken  int
	)
	_ = parallel(2*tokens, 16, func(i int) error {
		tok, id := i/2, fmt.Sprintf("burst-%03d-%d", i/2, i%2)
		d, err := enrollOver(clientFrom(i), n.enrollAddr, toks[tok].Secret, id)
		mu.Lock()
		defer mu.Unlock()
		var r *enrollRefused
		switch {
		case err == nil:
			got = append(got, issued{tok, id, d})
			if len(got) == killAfter {
				n.kill()
			}
		case errors.As(err, &r):
			refused++
		default:
			broken++
		}
		return nil
	})
	n.kill()
	t.Logf("%d certificates issued, %d refused, %d cut off by the kill", len(got), refused, broken)
	if len(got) < killAfter || broken == 0 {
		t.Fatalf("the kill did not land mid-burst: %d issued, %d cut off", len(got), broken)
	}

	ctx := context.Background()
	db := checkStoreFile(t, data)
	seen := map[int]string{}
	for _, g := range got {
		if other, ok := seen[g.token]; ok {
			t.Errorf("token %d issued certificates to both %s and %s", g.token, other, g.id)
		}
		seen[g.token] = g.id
		serial := enroll.SerialHex(g.d.cert.SerialNumber)
		c, err := db.Cert(ctx, serial)
		if err != nil || c.DeviceID != g.id || string(c.DER) != string(g.d.cert.Raw) {
			t.Errorf("certificate %s handed to %s is not recorded (%v)", serial, g.id, err)
			continue
		}
		dev, err := db.Device(ctx, g.id)
		if err != nil || dev.Serial != serial || dev.TokenID != toks[g.token].ID {
			t.Errorf("device %s: %+v (%v)", g.id, dev, err)
		}
	}
	devs, err := db.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	perToken := map[string]int{}
	for _, d := range devs {
		perToken[d.TokenID]++
	}
	stored, err := db.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range stored {
		if tok.Uses > tok.MaxUses || perToken[tok.ID] > 1 || perToken[tok.ID] != tok.Uses {
			t.Errorf("token %s: %d uses of %d, %d devices", tok.ID, tok.Uses, tok.MaxUses, perToken[tok.ID])
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	// The restarted node serves the devices that got a certificate.
	n2 := startNode(t, bin, data, nil)
	if err := parallel(len(got), 8, func(i int) error {
		c, err := dialQoS1(n2.mqttAddr, deviceTLS(pool, got[i].d), got[i].id, 30)
		if err != nil {
			return fmt.Errorf("%s connects after the restart: %w", got[i].id, err)
		}
		c.close()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	n2.stop()
}
