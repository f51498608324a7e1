package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

func at(i int) time.Time { return t0.Add(time.Duration(i) * time.Second) }

func msg(dev string, i int) store.Message {
	return store.Message{
		DeviceID: dev,
		Topic:    fmt.Sprintf("fleet/%s/t/%d", dev, i),
		Received: at(i),
		QoS:      byte(i % 3),
		Payload:  []byte{byte(i), 0, 0xff, '\n'},
	}
}

func received(ms []store.Message) []int {
	var out []int
	for _, m := range ms {
		out = append(out, int(m.Received.Sub(t0)/time.Second))
	}
	return out
}

func equalInts(a, b []int) bool { return fmt.Sprint(a) == fmt.Sprint(b) }

func TestTelemetryOrderSinceLimit(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	// Out of order and in several calls; two messages share a timestamp.
	var batch []store.Message
	for _, i := range []int{5, 1, 9, 0, 3, 7} {
		batch = append(batch, msg("a", i))
	}
	batch = append(batch, msg("b", 4))
	if err := db.AppendTelemetry(ctx, batch); err != nil {
		t.Fatal(err)
	}
	twin := msg("a", 5)
	twin.Topic = "second at 5"
	twin.Payload = nil
	for _, m := range []store.Message{msg("a", 2), msg("a", 4), msg("a", 6), msg("a", 8), twin} {
		if err := db.AppendTelemetry(ctx, []store.Message{m}); err != nil {
			t.Fatal(err)
		}
	}

	all, err := db.Telemetry(ctx, "a", time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := []int{0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9}; !equalInts(received(all), want) {
		t.Fatalf("order %v, want %v", received(all), want)
	}
	for _, m := range all {
		i := int(m.Received.Sub(t0) / time.Second)
		want := msg("a", i)
		if m.Topic == twin.Topic {
			want = twin
		}
		if m.DeviceID != "a" || m.Topic != want.Topic || m.QoS != want.QoS || !bytes.Equal(m.Payload, want.Payload) {
			t.Fatalf("message %+v, want %+v", m, want)
		}
	}
	if all[5].Topic != msg("a", 5).Topic || all[6].Topic != twin.Topic {
		t.Fatalf("same-time messages not in arrival order: %q, %q", all[5].Topic, all[6].Topic)
	}

	got, err := db.Telemetry(ctx, "a", at(6), 0)
	if err != nil || !equalInts(received(got), []int{6, 7, 8, 9}) {
		t.Fatalf("since 6: %v %v", received(got), err)
	}
	got, err = db.Telemetry(ctx, "a", at(2), 3)
	if err != nil || !equalInts(received(got), []int{7, 8, 9}) {
		t.Fatalf("since 2 limit 3: %v %v", received(got), err)
	}
	got, err = db.TelemetryAfter(ctx, "a", at(4), 3)
	if err != nil || !equalInts(received(got), []int{5, 5, 6}) {
		t.Fatalf("after 4 limit 3: %v %v", received(got), err)
	}
	got, err = db.TelemetryAfter(ctx, "a", time.Time{}, 2)
	if err != nil || !equalInts(received(got), []int{0, 1}) {
		t.Fatalf("after zero limit 2: %v %v", received(got), err)
	}
	got, err = db.TelemetryAfter(ctx, "a", at(9), 0)
	if err != nil || len(got) != 0 {
		t.Fatalf("after newest: %v %v", received(got), err)
	}
	got, err = db.Telemetry(ctx, "nobody", time.Time{}, 0)
	if err != nil || len(got) != 0 {
		t.Fatalf("unknown device: %v %v", got, err)
	}
	got, err = db.Telemetry(ctx, "b", time.Time{}, 0)
	if err != nil || !equalInts(received(got), []int{4}) {
		t.Fatalf("device b: %v %v", received(got), err)
	}

}

// Payloads must be copies: after Close the file is unmapped, and a slice
// into the map would fault. The device's bucket is made too large to be
// stored inline, since bbolt copies small inline buckets out of the map.
func TestTelemetryPayloadOutlivesTransaction(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTestPath(t, filepath.Join(t.TempDir(), "fleet.db"), store.Options{})
	payload := func(i int) []byte { return bytes.Repeat([]byte{byte(i), 0, 0xff}, 40) }
	var batch []store.Message
	for i := range 200 {
		batch = append(batch, store.Message{DeviceID: "a", Topic: "t", Received: at(i), Payload: payload(i)})
	}
	if err := db.AppendTelemetry(ctx, batch); err != nil {
		t.Fatal(err)
	}
	got, err := db.Telemetry(ctx, "a", time.Time{}, 0)
	if err != nil || len(got) != 200 {
		t.Fatalf("read %d %v", len(got), err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	for i, m := range got {
		if !bytes.Equal(m.Payload, payload(i)) {
			t.Fatalf("payload %d changed after Close", i)
		}
	}
}

func TestAppendTelemetryRefusesBadMessages(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	for _, m := range []store.Message{
		{Topic: "no device", Received: t0},
		{DeviceID: "a", Topic: "zero time"},
		{DeviceID: "a", Topic: "1960", Received: time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC)},
	} {
		before := store.Snapshot(t, db)
		err := db.AppendTelemetry(ctx, []store.Message{msg("a", 1), m})
		if !errors.Is(err, store.ErrInvalid) {
			t.Fatalf("%s: err %v, want ErrInvalid", m.Topic, err)
		}
		if len(diff(before, store.Snapshot(t, db))) != 0 {
			t.Fatalf("%s: refused batch was partly written", m.Topic)
		}
	}
}

func TestPruneTelemetry(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	var batch []store.Message
	for i := range 10 {
		batch = append(batch, msg("a", i), msg("b", i))
	}
	batch = append(batch, msg("c", 1), msg("c", 2))
	if err := db.AppendTelemetry(ctx, batch); err != nil {
		t.Fatal(err)
	}

	n, err := db.PruneTelemetry(ctx, at(4), 0)
	if err != nil || n != 10 {
		t.Fatalf("prune by age: %d %v, want 10", n, err)
	}
	for _, dev := range []string{"a", "b"} {
		got, err := db.Telemetry(ctx, dev, time.Time{}, 0)
		if err != nil || !equalInts(received(got), []int{4, 5, 6, 7, 8, 9}) {
			t.Fatalf("%s after age prune: %v %v", dev, received(got), err)
		}
	}
	if got, err := db.Telemetry(ctx, "c", time.Time{}, 0); err != nil || len(got) != 0 {
		t.Fatalf("c after age prune: %v %v", received(got), err)
	}

	n, err = db.PruneTelemetry(ctx, time.Time{}, 2)
	if err != nil || n != 8 {
		t.Fatalf("prune by count: %d %v, want 8", n, err)
	}
	for _, dev := range []string{"a", "b"} {
		got, err := db.Telemetry(ctx, dev, time.Time{}, 0)
		if err != nil || !equalInts(received(got), []int{8, 9}) {
			t.Fatalf("%s after count prune: %v %v", dev, received(got), err)
		}
	}
	if n, err := db.PruneTelemetry(ctx, at(4), 2); err != nil || n != 0 {
		t.Fatalf("nothing left to prune: %d %v", n, err)
	}
	// Both limits at once: age removes 8, count then keeps only 9.
	n, err = db.PruneTelemetry(ctx, at(9), 1)
	if err != nil || n != 2 {
		t.Fatalf("prune by age and count: %d %v, want 2", n, err)
	}
	// A device emptied earlier can receive telemetry again.
	if err := db.AppendTelemetry(ctx, []store.Message{msg("c", 20)}); err != nil {
		t.Fatal(err)
	}
	if got, err := db.Telemetry(ctx, "c", time.Time{}, 0); err != nil || !equalInts(received(got), []int{20}) {
		t.Fatalf("c after re-append: %v %v", received(got), err)
	}
}

// The count cap keeps each device's newest maxPerDevice messages (in key
// order: by receive time) across passes with appends in between, receive
// times that go back (a clock stepped back), devices emptied and written
// again, and caps that take several transactions.
func TestPruneTelemetryCountAcrossPasses(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	rng := rand.New(rand.NewPCG(1, 2))
	model := map[string][]time.Time{} // what each device should hold
	devs := []string{"a", "b", "c", "d"}
	clock := 0
	for round := range 40 {
		var batch []store.Message
		for range rng.IntN(400) {
			dev := devs[rng.IntN(len(devs))]
			clock += rng.IntN(5) - 1 // sometimes back
			at := t0.Add(time.Duration(clock) * time.Millisecond)
			batch = append(batch, store.Message{DeviceID: dev, Topic: "t", Received: at, Payload: []byte{1}})
			model[dev] = append(model[dev], at)
		}
		slices.SortStableFunc(batch, func(a, b store.Message) int { return strings.Compare(a.DeviceID, b.DeviceID) })
		if err := db.AppendTelemetry(ctx, batch); err != nil {
			t.Fatal(err)
		}
		maxPer := 1 + rng.IntN(150)
		var before time.Time
		if round%7 == 6 {
			before = t0.Add(time.Duration(clock+10) * time.Millisecond) // everything goes
		}
		want := 0
		for dev, ts := range model {
			slices.SortStableFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
			keep := ts
			for len(keep) > 0 && keep[0].Before(before) {
				keep = keep[1:]
			}
			keep = keep[max(0, len(keep)-maxPer):]
			want += len(ts) - len(keep)
			model[dev] = slices.Clone(keep)
		}
		n, err := db.PruneTelemetry(ctx, before, maxPer)
		if err != nil || n != want {
			t.Fatalf("round %d (cap %d): pruned %d %v, want %d", round, maxPer, n, err, want)
		}
		for _, dev := range devs {
			got, err := db.Telemetry(ctx, dev, time.Time{}, 100_000)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(model[dev]) {
				t.Fatalf("round %d: %s holds %d messages, want %d", round, dev, len(got), len(model[dev]))
			}
			for i, m := range got {
				if !m.Received.Equal(model[dev][i]) {
					t.Fatalf("round %d: %s message %d received %v, want %v", round, dev, i, m.Received, model[dev][i])
				}
			}
		}
	}
	// A cap that deletes more than one transaction's worth from one device.
	batch := make([]store.Message, 25_000)
	for i := range batch {
		batch[i] = store.Message{DeviceID: "z", Topic: "t", Received: t0.Add(time.Duration(i)), Payload: []byte{1}}
	}
	if err := db.AppendTelemetry(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if n, err := db.PruneTelemetry(ctx, time.Time{}, 1000); err != nil || n < 24_000 {
		t.Fatalf("pruned %d %v, want at least 24,000", n, err)
	}
	if got, err := db.Telemetry(ctx, "z", time.Time{}, 100_000); err != nil || len(got) != 1000 || !got[0].Received.Equal(t0.Add(24_000)) {
		t.Fatalf("z holds %d messages (%v), want the newest 1000", len(got), err)
	}
}

func TestPruneTelemetryInChunks(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	const n = 25_000
	batch := make([]store.Message, 0, n)
	for i := range n {
		batch = append(batch, store.Message{DeviceID: "a", Topic: "t", Received: t0.Add(time.Duration(i)), Payload: []byte{1}})
	}
	if err := db.AppendTelemetry(ctx, batch); err != nil {
		t.Fatal(err)
	}
	groups := countGroups(db)
	got, err := db.PruneTelemetry(ctx, t0.Add(time.Hour), 0)
	if err != nil || got != n {
		t.Fatalf("pruned %d %v, want %d", got, err, n)
	}
	if groups := groups(); groups < 3 {
		t.Fatalf("prune of %d messages took %d transactions, want at least 3", n, groups)
	}
	if msgs, err := db.Telemetry(ctx, "a", time.Time{}, 0); err != nil || len(msgs) != 0 {
		t.Fatalf("left %d messages, %v", len(msgs), err)
	}
}

// countGroups counts the write transactions db commits from now on.
func countGroups(db *store.DB) func() int {
	var n atomic.Int64
	store.SetGroupHook(db, func(int) { n.Add(1) })
	return func() int { return int(n.Load()) }
}

// A pass over many devices with nothing to delete is still cut into short
// transactions: each device costs a page read when the cache is cold.
func TestPruneTelemetryManyDevicesInChunks(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	const devices = 1_200
	batch := make([]store.Message, 0, devices)
	for i := range devices {
		batch = append(batch, store.Message{DeviceID: fmt.Sprintf("dev-%04d", i), Topic: "t", Received: t0, Payload: []byte{1}})
	}
	if err := db.AppendTelemetry(ctx, batch); err != nil {
		t.Fatal(err)
	}
	groups := countGroups(db)
	if n, err := db.PruneTelemetry(ctx, t0, 10); err != nil || n != 0 {
		t.Fatalf("pruned %d %v, want 0", n, err)
	}
	if groups := groups(); groups < 3 {
		t.Errorf("a pass over %d devices took %d transactions, want at least 3", devices, groups)
	}
	// Every device is still visited: the last one's excess is pruned.
	last := fmt.Sprintf("dev-%04d", devices-1)
	if err := db.AppendTelemetry(ctx, []store.Message{{DeviceID: last, Topic: "t", Received: t0.Add(time.Second), Payload: []byte{2}}}); err != nil {
		t.Fatal(err)
	}
	if n, err := db.PruneTelemetry(ctx, t0, 1); err != nil || n != 1 {
		t.Fatalf("pruned %d %v, want the last device's older message", n, err)
	}
}

func TestPresence(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	err := db.SetPresence(ctx,
		store.Presence{DeviceID: "a", Online: true, LastSeen: t0, Node: "n1"},
		store.Presence{DeviceID: "b", Online: true, LastSeen: t0},
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.SetPresence(ctx, store.Presence{DeviceID: "b", Online: false, LastSeen: at(5)}); err != nil {
		t.Fatal(err)
	}
	ps, err := db.Presences(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if a := ps["a"]; len(ps) != 2 || !a.Online || a.Node != "n1" || !a.LastSeen.Equal(t0) {
		t.Fatalf("presences %+v", ps)
	}
	if b := ps["b"]; b.Online || !b.LastSeen.Equal(at(5)) {
		t.Fatalf("b %+v", b)
	}
	if err := db.SetPresence(ctx, store.Presence{}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("empty id: %v", err)
	}
}
