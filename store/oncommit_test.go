package store_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

func TestOnCommitReportsEachGroup(t *testing.T) {
	type call struct {
		d time.Duration
		n int
	}
	var mu sync.Mutex
	var calls []call
	db := store.OpenTestPath(t, filepath.Join(t.TempDir(), "fleet.db"), store.Options{
		OnCommit: func(d time.Duration, n int, err error) {
			if err != nil {
				t.Errorf("commit failed: %v", err)
			}
			mu.Lock()
			calls = append(calls, call{d, n})
			mu.Unlock()
		},
	})
	ctx := context.Background()
	if err := db.SetPresence(ctx, store.Presence{DeviceID: "pi-1", Online: true}); err != nil {
		t.Fatal(err)
	}
	// A request that fails inside its transaction is rolled back: no call.
	if _, err := db.RevokeDevice(ctx, "nope", "test", time.Now()); err == nil {
		t.Fatal("revoked an unknown device")
	}
	// Held back by the writer, three requests share one commit.
	release := store.BlockWriter(t, db)
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() {
			if err := db.AppendTelemetry(ctx, []store.Message{msg("pi-1", i)}); err != nil {
				t.Error(err)
			}
		})
	}
	store.WaitQueued(t, db, 3)
	release()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 2 || calls[0].n != 1 || calls[1].n != 3 {
		t.Fatalf("OnCommit calls %+v, want one of 1 request then one of 3", calls)
	}
	for _, c := range calls {
		if c.d <= 0 {
			t.Errorf("commit duration %v", c.d)
		}
	}
}
