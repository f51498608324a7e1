package store_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// The benchmarks run 8 goroutines per CPU, each doing one write per call:
// with group commit the rate is far above one fsync pair per write.

func BenchmarkEnrollParallel(b *testing.B) {
	ctx := context.Background()
	db := store.OpenTest(b)
	hash := tokenHash("bench")
	mustCreateTokens(b, db, store.Token{ID: "bench", Hash: hash, MaxUses: 1 << 40, ExpiresAt: t0.Add(time.Hour)})
	var next atomic.Int64
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := next.Add(1)
			id := fmt.Sprint("dev-", i)
			if err := db.Enroll(ctx, enrollment(hash, id, fmt.Sprint("serial-", i))); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

func BenchmarkAppendTelemetryParallel(b *testing.B) {
	ctx := context.Background()
	db := store.OpenTest(b)
	var next atomic.Int64
	payload := make([]byte, 64)
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := next.Add(1)
			m := store.Message{DeviceID: fmt.Sprint("dev-", i%100), Topic: "fleet/t", Received: t0.Add(time.Duration(i)), QoS: 1, Payload: payload}
			if err := db.AppendTelemetry(ctx, []store.Message{m}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// BenchmarkPruneNothingToDelete is the per-minute retention pass of a
// fleet whose devices are all under their caps: 100 devices with 20,000
// messages each, a count cap of 100,000. The writer is held for the
// pass's write transactions, so its cost should not grow with the
// messages stored.
func BenchmarkPruneNothingToDelete(b *testing.B) {
	ctx := context.Background()
	db := store.OpenTest(b)
	payload := make([]byte, 64)
	const devices, per = 100, 20_000
	for d := range devices {
		batch := make([]store.Message, per)
		for i := range batch {
			batch[i] = store.Message{DeviceID: fmt.Sprint("dev-", d), Topic: "t", Received: t0.Add(time.Duration(i) * time.Second), Payload: payload}
		}
		if err := db.AppendTelemetry(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
	// The first pass counts once per process; later passes are the steady state.
	if _, err := db.PruneTelemetry(ctx, t0, 100_000); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		if n, err := db.PruneTelemetry(ctx, t0, 100_000); err != nil || n != 0 {
			b.Fatalf("pruned %d %v", n, err)
		}
	}
}

// BenchmarkTokenChecksLargeStore is the one-usable-token-per-id check on a
// store holding 100,000 bound tokens: a bound token created, and a free
// token enrolling an id (both check the id's tokens inside the writer's
// transaction, while every other commit waits).
func BenchmarkTokenChecksLargeStore(b *testing.B) {
	ctx := context.Background()
	db := store.OpenTest(b)
	const stored, chunk = 100_000, 1_000
	for i := 0; i < stored; i += chunk {
		toks := make([]store.Token, chunk)
		for j := range toks {
			id := fmt.Sprint("old-", i+j)
			toks[j] = store.Token{ID: id, Hash: tokenHash(id), MaxUses: 1, DeviceID: "pi-" + id, ExpiresAt: t0.Add(time.Hour)}
		}
		mustCreateTokens(b, db, toks...)
	}
	free := tokenHash("free")
	mustCreateTokens(b, db, store.Token{ID: "free", Hash: free, MaxUses: 1 << 40, ExpiresAt: t0.Add(time.Hour)})
	next := 0 // b.Run calls each function more than once
	b.Run("create", func(b *testing.B) {
		for range b.N {
			next++
			id := fmt.Sprint("new-", next)
			if err := db.CreateTokens(ctx, []store.Token{{ID: id, Hash: tokenHash(id), MaxUses: 1, DeviceID: "pi-" + id, ExpiresAt: t0.Add(time.Hour)}}, "admin", t0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("free-enroll", func(b *testing.B) {
		for range b.N {
			next++
			if err := db.Enroll(ctx, enrollment(free, fmt.Sprint("dev-", next), fmt.Sprint("serial-", next))); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRevokeDevices is one `fleetmq device revoke --from FILE` of n
// ids on the store side: one transaction, during which every other write
// waits. Certificates carry a DER as large as a real one.
func BenchmarkRevokeDevices(b *testing.B) {
	ctx := context.Background()
	der := make([]byte, 600)
	for _, n := range []int{150, 10_000} {
		b.Run(fmt.Sprint("ids=", n), func(b *testing.B) {
			db := store.OpenTest(b)
			next := 0
			for b.Loop() {
				b.StopTimer()
				ids := make([]string, n)
				errs := make(chan error, n)
				for i := range ids {
					next++
					ids[i] = fmt.Sprintf("svc-%06d", next)
					c := cert(ids[i], fmt.Sprint("serial-", next))
					c.DER = der
					// Concurrent, to share commits.
					go func() {
						errs <- db.CreateIdentity(ctx, store.Device{ID: ids[i], Role: store.RoleService}, c, "", t0)
					}()
				}
				for range ids {
					if err := <-errs; err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				if _, err := db.RevokeDevices(ctx, ids, "admin", t0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
