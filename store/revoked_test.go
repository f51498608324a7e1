package store_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fleetmq/fleetmq/store"
)

// checkRevocations checks that the CRL index lists exactly the revoked
// certificate records, with their revocation and expiry times, and
// returns it.
func checkRevocations(tb testing.TB, db *store.DB) []store.Revocation {
	tb.Helper()
	ctx := context.Background()
	got, err := db.Revocations(ctx)
	if err != nil {
		tb.Fatalf("revocations: %v", err)
	}
	certs, err := db.RevokedCerts(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	want := make([]store.Revocation, len(certs))
	for i, c := range certs {
		want[i] = store.Revocation{Serial: c.Serial, RevokedAt: c.RevokedAt.UTC(), NotAfter: c.NotAfter.UTC()}
	}
	if !slices.Equal(got, want) {
		tb.Errorf("revocation index %+v\nwant the records' %+v", got, want)
	}
	return got
}

func TestRevocations(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	hash, again := tokenHash("t"), tokenHash("again")
	mustCreateTokens(t, db, store.Token{ID: "t", Hash: hash, MaxUses: 2, ExpiresAt: t0.Add(time.Hour)})
	for _, e := range []store.Enrollment{enrollment(hash, "dev-1", "a1"), enrollment(hash, "dev-2", "b1")} {
		if err := db.Enroll(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	mustCreateTokens(t, db, store.Token{ID: "again", Hash: again, DeviceID: "dev-2", Reprovision: true, MaxUses: 1, ExpiresAt: t0.Add(3 * time.Hour)})
	if got := checkRevocations(t, db); len(got) != 0 {
		t.Fatalf("revocations before any: %+v", got)
	}
	// A sub-second time in another zone comes back as the same instant, in UTC.
	at := t0.Add(time.Hour + 123456789*time.Nanosecond).In(time.FixedZone("x", 3600))
	renewed := cert("dev-1", "a2")
	renewed.NotAfter = t0.Add(48 * time.Hour)
	if err := db.Renew(ctx, store.Renewal{DeviceID: "dev-1", OldSerial: "a1", Cert: renewed, Now: t0}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.RevokeDevice(ctx, "dev-1", "", at); err != nil {
		t.Fatal(err)
	}
	// Re-provisioning revokes the earlier certificates too.
	e := enrollment(again, "dev-2", "b2")
	e.Now = t0.Add(2 * time.Hour)
	if err := db.Enroll(ctx, e); err != nil {
		t.Fatal(err)
	}
	want := []store.Revocation{
		{Serial: "a1", RevokedAt: at.UTC(), NotAfter: t0.Add(24 * time.Hour)},
		{Serial: "a2", RevokedAt: at.UTC(), NotAfter: t0.Add(48 * time.Hour)},
		{Serial: "b1", RevokedAt: t0.Add(2 * time.Hour), NotAfter: t0.Add(24 * time.Hour)},
	}
	if got := checkRevocations(t, db); !slices.Equal(got, want) {
		t.Errorf("revocations %+v\nwant %+v", got, want)
	}
	// Pruned records leave the index with them.
	if _, err := db.PruneCerts(ctx, t0.Add(30*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := checkRevocations(t, db); !slices.Equal(got, want[1:2]) {
		t.Errorf("after pruning: %+v, want only dev-1's current certificate", got)
	}
}

// A store whose revocations were recorded before the index existed (by
// an older fleetmq: serial -> empty) is indexed when it is opened.
func TestRevocationsIndexedOnOpen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	hash := tokenHash("t")
	mustCreateTokens(t, db, store.Token{ID: "t", Hash: hash, MaxUses: 3, ExpiresAt: t0.Add(time.Hour)})
	for _, e := range []store.Enrollment{enrollment(hash, "dev-1", "a1"), enrollment(hash, "dev-2", "b1"), enrollment(hash, "dev-3", "c1")} {
		if err := db.Enroll(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"dev-1", "dev-3"} {
		if _, err := db.RevokeDevice(ctx, id, "", t0.Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	want := checkRevocations(t, db)
	oldLayout := func(fn func(tx *bbolt.Tx) error) {
		t.Helper()
		err := store.UpdateRaw(ctx, db, func(tx *bbolt.Tx) error {
			b := tx.Bucket([]byte("revoked_certs"))
			for _, s := range []string{"a1", "c1"} {
				if err := b.Put([]byte(s), nil); err != nil {
					return err
				}
			}
			return fn(tx)
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
	}
	oldLayout(func(*bbolt.Tx) error { return nil })
	db = store.OpenTestPath(t, path, store.Options{})
	if got := checkRevocations(t, db); !slices.Equal(got, want) || len(got) != 2 {
		t.Errorf("after reopening: %+v, want %+v", got, want)
	}

	// A revoked serial whose record is gone is damage: the store still
	// opens, and listing the revocations says what is missing.
	oldLayout(func(tx *bbolt.Tx) error { return tx.Bucket([]byte("certs")).Delete([]byte("c1")) })
	db = store.OpenTestPath(t, path, store.Options{})
	if _, err := db.Revocations(ctx); !errors.Is(err, store.ErrCertUnknown) {
		t.Errorf("revocations with a record missing: %v, want ErrCertUnknown", err)
	}
}
