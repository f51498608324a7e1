package store_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fleetmq/fleetmq/store"
)

// boundIndexKeys returns the keys of the bound-token index under id.
func boundIndexKeys(t *testing.T, db *store.DB, id string) int {
	t.Helper()
	n := 0
	err := store.UpdateRaw(context.Background(), db, func(tx *bbolt.Tx) error {
		return tx.Bucket([]byte("token_bound")).ForEach(func(k, _ []byte) error {
			if bytes.HasPrefix(k, append([]byte(id), 0)) {
				n++
			}
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Tokens written without the bound-token index (by a fleetmq from before
// it, or by one since) are indexed when the store is opened: the one
// usable token per id rule reads only the index.
func TestBoundTokenIndexRebuiltOnOpen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	mustCreateTokens(t, db, boundToken("a", "pi-1"), boundToken("b", "pi-2"))
	err := store.UpdateRaw(ctx, db, func(tx *bbolt.Tx) error {
		if err := tx.DeleteBucket([]byte("token_bound")); err != nil {
			return err
		}
		_, err := tx.CreateBucket([]byte("token_bound"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = store.OpenTestPath(t, path, store.Options{})
	if err := db.CreateTokens(ctx, []store.Token{boundToken("c", "pi-1")}, "admin", t0); !errors.Is(err, store.ErrTokenLive) {
		t.Fatalf("second token for pi-1 after reopening: %v, want ErrTokenLive", err)
	}
	mustCreateTokens(t, db, boundToken("d", "pi-3"))
}

// Pruning a token drops its index entry; an entry left by a free token
// indexed under a label named device_id, once pruned, blocks nothing.
func TestBoundTokenIndexAfterPrune(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	expired := boundToken("old", "pi-1")
	expired.ExpiresAt = t0
	free := store.Token{ID: "free", Hash: tokenHash("free"), MaxUses: 1, Labels: map[string]string{"device_id": "pi-2"},
		CreatedAt: t0, ExpiresAt: t0}
	mustCreateTokens(t, db, expired, free)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = store.OpenTestPath(t, path, store.Options{}) // indexes the free token under pi-2
	if n := boundIndexKeys(t, db, "pi-1"); n != 1 {
		t.Fatalf("%d index entries for pi-1, want 1", n)
	}
	if n, err := db.PruneTokens(ctx, t0.Add(time.Minute)); err != nil || n != 2 {
		t.Fatalf("pruned %d: %v, want 2", n, err)
	}
	if n := boundIndexKeys(t, db, "pi-1"); n != 0 {
		t.Fatalf("%d index entries for pi-1 after its token was pruned, want 0", n)
	}
	mustCreateTokens(t, db, boundToken("new1", "pi-1"), boundToken("new2", "pi-2"))
}
