package store_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// A full disk, played by RLIMIT_FSIZE (writes past the size fail, as on a
// full file system; Go ignores SIGXFSZ): the commit fails, its request gets
// the error and OnCommit sees it, nothing of it is stored, and once there
// is room again the store writes on without being reopened.
func TestFullDiskFailsCommitsAndRecovers(t *testing.T) {
	ctx := context.Background()
	var mu sync.Mutex
	var failed []error
	db := store.OpenTestPath(t, filepath.Join(t.TempDir(), "fleet.db"), store.Options{
		OnCommit: func(_ time.Duration, _ int, err error) {
			if err != nil {
				mu.Lock()
				failed = append(failed, err)
				mu.Unlock()
			}
		},
	})
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
		t.Fatal(err)
	}
	limited := old
	limited.Cur = 1 << 20
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &limited); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(restore)

	payload := bytes.Repeat([]byte("x"), 16<<10)
	stored := 0
	var err error
	for i := range 1000 {
		if err = db.AppendTelemetry(ctx, []store.Message{{DeviceID: "a", Topic: "t", Received: at(i), Payload: payload}}); err != nil {
			break
		}
		stored++
	}
	if err == nil {
		t.Fatal("16 MiB of telemetry fitted under a 1 MiB file size limit")
	}
	t.Logf("%d messages stored, then: %v", stored, err)
	// bbolt flattens the cause into text; callers still tell a full disk
	// from a fault.
	if !errors.Is(err, syscall.EFBIG) {
		t.Errorf("the commit error does not say the file could not grow: %v", err)
	}
	restore()
	mu.Lock()
	if len(failed) == 0 {
		t.Errorf("OnCommit saw no failed commit; AppendTelemetry returned %v", err)
	}
	mu.Unlock()

	got, err := db.Telemetry(ctx, "a", t0.Add(-time.Second), 10_000)
	if err != nil || len(got) != stored {
		t.Fatalf("%d messages stored after the failure (%v), want the %d acknowledged", len(got), err, stored)
	}
	if err := db.AppendTelemetry(ctx, []store.Message{{DeviceID: "a", Topic: "t", Received: at(stored), Payload: payload}}); err != nil {
		t.Fatalf("with room again: %v", err)
	}
	if got, _ := db.Telemetry(ctx, "a", t0.Add(-time.Second), 10_000); len(got) != stored+1 {
		t.Fatalf("%d messages after the recovery, want %d", len(got), stored+1)
	}
	if err := db.Check(); err != nil {
		t.Fatal(err)
	}
}
