package store_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetmq/fleetmq/store"
)

// A backup taken while telemetry is being written is a store Open accepts,
// passes bbolt's check and holds a prefix of what was written: every
// message committed before the backup started, none half-written.
func TestBackupWhileWriting(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	const before, during = 500, 2000
	for i := range before {
		if err := db.AppendTelemetry(ctx, []store.Message{msg("a", i)}); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() {
		for i := before; i < before+during; i++ {
			if err := db.AppendTelemetry(ctx, []store.Message{msg("a", i)}); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()

	path := filepath.Join(t.TempDir(), "backup.db")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	var announced int64 = -1
	n, err := db.Backup(ctx, f, func(size int64) { announced = size })
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n != announced || n <= 0 {
		t.Fatalf("wrote %d bytes, announced %d", n, announced)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != n {
		t.Fatalf("file: %v, %v; want %d bytes", fi, err, n)
	}

	cp := store.OpenTestPath(t, path, store.Options{})
	if err := cp.Check(); err != nil {
		t.Fatal(err)
	}
	got, err := cp.Telemetry(ctx, "a", t0.Add(-1), before+during)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < before {
		t.Fatalf("backup holds %d messages, want at least the %d written before it", len(got), before)
	}
	want, err := db.Telemetry(ctx, "a", t0.Add(-1), before+during)
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range got {
		if !m.Received.Equal(want[i].Received) || !bytes.Equal(m.Payload, want[i].Payload) {
			t.Fatalf("message %d differs: %+v, live %+v", i, m, want[i])
		}
	}
}

type failingWriter struct{ after int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.after <= 0 {
		return 0, errors.New("disk full")
	}
	w.after--
	return len(p), nil
}

func TestBackupErrors(t *testing.T) {
	db := store.OpenTest(t)
	if _, err := db.Backup(context.Background(), &failingWriter{after: 2}, nil); err == nil {
		t.Fatal("a failing writer: no error")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := db.Backup(ctx, &bytes.Buffer{}, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	// The store carries on after a failed backup.
	if err := db.AppendTelemetry(context.Background(), []store.Message{msg("a", 1)}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Backup(context.Background(), &bytes.Buffer{}, nil); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("closed: %v", err)
	}
}
