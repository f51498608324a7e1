package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

func TestBindCA(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	if has, err := db.HasIdentities(ctx); has || err != nil {
		t.Fatalf("a new store has identities: %v %v", has, err)
	}
	hash := tokenHash("free")
	mustCreateTokens(t, db, store.Token{ID: "free", Hash: hash, MaxUses: 1, ExpiresAt: t0.Add(time.Hour)})
	if err := db.Enroll(ctx, enrollment(hash, "dev-1", "s1")); err != nil {
		t.Fatal(err)
	}
	if has, err := db.HasIdentities(ctx); !has || err != nil {
		t.Fatalf("after an enrollment: %v %v", has, err)
	}
	// The first CA is recorded (a store from before binding included);
	// the same one passes, another never does.
	for _, key := range []string{"key-a", "key-a"} {
		if err := db.BindCA(ctx, key); err != nil {
			t.Fatalf("bind %s: %v", key, err)
		}
	}
	if err := db.BindCA(ctx, "key-b"); !errors.Is(err, store.ErrCAMismatch) {
		t.Fatalf("another CA: %v", err)
	}
	if err := db.BindCA(ctx, "key-a"); err != nil {
		t.Fatalf("a refused CA changed the binding: %v", err)
	}
}

// A store is bound by the first start, before any identity exists.
func TestBoundCA(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	if key, err := db.BoundCA(ctx); key != "" || err != nil {
		t.Fatalf("a new store is bound: %q %v", key, err)
	}
	if err := db.BindCA(ctx, "key-a"); err != nil {
		t.Fatal(err)
	}
	if key, err := db.BoundCA(ctx); key != "key-a" || err != nil {
		t.Fatalf("bound to %q %v, want key-a", key, err)
	}
}
