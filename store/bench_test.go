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
