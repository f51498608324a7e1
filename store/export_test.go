package store

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

// OpenTest opens a store in a fresh temporary directory with default options.
func OpenTest(tb testing.TB) *DB {
	tb.Helper()
	return OpenTestPath(tb, filepath.Join(tb.TempDir(), "fleet.db"), Options{})
}

// OpenTestPath opens the store at path and, at cleanup, checks its
// consistency and closes it unless the test already did.
func OpenTestPath(tb testing.TB, path string, opts Options) *DB {
	tb.Helper()
	db, err := Open(path, opts)
	if err != nil {
		tb.Fatalf("open store: %v", err)
	}
	tb.Cleanup(func() {
		if err := db.Check(); err != nil && !errors.Is(err, ErrClosed) {
			tb.Errorf("store check: %v", err)
		}
		if err := db.Close(); err != nil && !errors.Is(err, ErrClosed) {
			tb.Errorf("close store: %v", err)
		}
	})
	return db
}

// Snapshot returns every key, value and bucket sequence in the file, so a
// test can prove that a refused request wrote nothing at all.
func Snapshot(tb testing.TB, db *DB) map[string]string {
	tb.Helper()
	snap := make(map[string]string)
	var walk func(path string, b *bbolt.Bucket) error
	walk = func(path string, b *bbolt.Bucket) error {
		snap[path+"#seq"] = fmt.Sprint(b.Sequence())
		return b.ForEach(func(k, v []byte) error {
			p := path + "/" + hex.EncodeToString(k)
			if v == nil {
				return walk(p, b.Bucket(k))
			}
			snap[p] = string(v)
			return nil
		})
	}
	err := db.view(context.Background(), func(tx *bbolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bbolt.Bucket) error {
			return walk(string(name), b)
		})
	})
	if err != nil {
		tb.Fatalf("snapshot: %v", err)
	}
	return snap
}

// BlockWriter parks the writer goroutine until release is called, so that a
// test can queue requests that will then be taken as one batch.
func BlockWriter(tb testing.TB, db *DB) (release func()) {
	tb.Helper()
	started, rel := make(chan struct{}), make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- db.exclusive(context.Background(), func() error {
			close(started)
			<-rel
			return nil
		})
	}()
	<-started
	return func() {
		close(rel)
		if err := <-errc; err != nil {
			tb.Errorf("blocked writer: %v", err)
		}
	}
}

// WaitQueued waits until n requests wait in the writer's queue.
func WaitQueued(tb testing.TB, db *DB, n int) {
	tb.Helper()
	WaitFor(tb, func() bool { return len(db.reqs) >= n })
}

// WaitFor polls cond until it holds, failing the test after 10s.
func WaitFor(tb testing.TB, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatal("condition not met within 10s")
		}
		<-tick.C
	}
}

// SetGroupHook makes the writer report the size of every group it commits.
// Call it before any concurrent use of db.
func SetGroupHook(db *DB, fn func(n int)) { db.groupHook = fn }

// UpdateRaw submits fn to the writer like any store write.
func UpdateRaw(ctx context.Context, db *DB, fn func(tx *bbolt.Tx) error) error {
	return db.update(ctx, fn)
}

// RevokeCertOnly revokes one certificate without its device, a state the
// API reaches only through a crash or a future per-certificate revocation.
func RevokeCertOnly(tb testing.TB, db *DB, serial string, at time.Time) {
	tb.Helper()
	err := db.update(context.Background(), func(tx *bbolt.Tx) error {
		c, err := getCert(tx, serial)
		if err != nil {
			return err
		}
		c.RevokedAt = at
		if err := putJSON(tx.Bucket(bucketCerts), []byte(serial), certRecord{Cert: c, DER: c.DER}); err != nil {
			return err
		}
		return putRevocation(tx, c)
	})
	if err != nil {
		tb.Fatalf("revoke cert %s: %v", serial, err)
	}
}

// SchemaVersion is the layout this code writes.
const SchemaVersion = schemaVersion

// SetCertPruneExamined sets how many certificate records one transaction
// of PruneCerts examines, until the test ends.
func SetCertPruneExamined(tb testing.TB, n int) {
	was := certPruneExamined
	certPruneExamined = n
	tb.Cleanup(func() { certPruneExamined = was })
}

// SetTokenPruneExamined sets how many token records one transaction of
// PruneTokens examines, until the test ends.
func SetTokenPruneExamined(tb testing.TB, n int) {
	was := tokenPruneExamined
	tokenPruneExamined = n
	tb.Cleanup(func() { tokenPruneExamined = was })
}
