package store_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// TestPruneTokens: tokens that expired before the cut go, used or not,
// with their public id; later ones stay and still enroll, also across the
// transactions a large table takes.
func TestPruneTokens(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	store.SetTokenPruneExamined(t, 7) // many transactions
	var toks []store.Token
	for i := range 40 {
		toks = append(toks, store.Token{ID: fmt.Sprintf("t%02d", i), Hash: tokenHash(fmt.Sprint(i)), MaxUses: 1,
			ExpiresAt: t0.Add(time.Duration(i+1) * time.Hour)})
	}
	mustCreateTokens(t, db, toks...)
	// t00 enrolled a device: used tokens go too, the device stays.
	if err := db.Enroll(ctx, enrollment(tokenHash("0"), "pi-0", "s0")); err != nil {
		t.Fatal(err)
	}

	cut := t0.Add(20*time.Hour + time.Minute) // t00 … t19 expired before it
	n, err := db.PruneTokens(ctx, cut)
	if err != nil || n != 20 {
		t.Fatalf("PruneTokens: %d, %v; want 20", n, err)
	}
	left, err := db.Tokens(ctx)
	if err != nil || len(left) != 20 {
		t.Fatalf("tokens left: %d, %v", len(left), err)
	}
	for _, tk := range left {
		if tk.ExpiresAt.Before(cut) {
			t.Errorf("token %s expiring %v kept", tk.ID, tk.ExpiresAt)
		}
	}
	if _, err := db.TokenByHash(ctx, tokenHash("3")); !errors.Is(err, store.ErrTokenUnknown) {
		t.Errorf("pruned token: %v, want ErrTokenUnknown", err)
	}
	if _, err := db.Device(ctx, "pi-0"); err != nil {
		t.Errorf("the device a pruned token enrolled: %v", err)
	}
	// A pruned token's id is free again, and a kept one enrolls.
	mustCreateTokens(t, db, store.Token{ID: "t05", Hash: tokenHash("again"), MaxUses: 1, ExpiresAt: t0.Add(100 * time.Hour)})
	e := enrollment(tokenHash("30"), "pi-30", "s30")
	e.Now = t0.Add(21 * time.Hour)
	if err := db.Enroll(ctx, e); err != nil {
		t.Errorf("enroll with a kept token: %v", err)
	}
	if n, err := db.PruneTokens(ctx, cut); err != nil || n != 0 {
		t.Fatalf("second pass: %d, %v; want 0", n, err)
	}
}
