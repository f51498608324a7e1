package store_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

func TestRestoredWindow(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	if _, _, ok, err := db.RestoredWindow(ctx, t0); ok || err != nil {
		t.Fatalf("a live store reports a restore window: %v %v", ok, err)
	}
	snap := t0.Add(-time.Hour)
	if err := db.MarkSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	// A first run with a clock before the snapshot is refused, and records
	// nothing that would stay once the clock is set.
	if _, _, ok, err := db.RestoredWindow(ctx, snap.Add(-time.Hour)); ok || err == nil || !strings.Contains(err.Error(), "the clock is wrong") {
		t.Fatalf("a restore before the snapshot: %v %v, want an error about the clock", ok, err)
	}
	// The first server to run on the copy records when; later runs see
	// the same window.
	for _, now := range []time.Time{t0, t0.Add(24 * time.Hour)} {
		from, to, ok, err := db.RestoredWindow(ctx, now)
		if err != nil || !ok || !from.Equal(snap) || !to.Equal(t0) {
			t.Fatalf("window at %v: %v %v %v %v, want %v to %v", now, from, to, ok, err, snap, t0)
		}
	}
	// A backup of the restored store is a new snapshot, not yet restored.
	if err := db.MarkSnapshot(ctx, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if from, to, _, _ := db.RestoredWindow(ctx, t0.Add(2*time.Hour)); !from.Equal(t0.Add(time.Hour)) || !to.Equal(t0.Add(2*time.Hour)) {
		t.Fatalf("after a new snapshot: %v to %v", from, to)
	}
}

func TestRenewAdoptsUnknownCertificate(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	hash := tokenHash("adopt")
	mustCreateTokens(t, db, store.Token{ID: "adopt", Hash: hash, MaxUses: 2, ExpiresAt: t0.Add(time.Hour)})
	if err := db.Enroll(ctx, enrollment(hash, "dev-1", "s1")); err != nil {
		t.Fatal(err)
	}
	lost := cert("dev-1", "s-lost") // issued after the backup, record lost
	renewal := store.Renewal{DeviceID: "dev-1", OldSerial: "s-lost", Cert: cert("dev-1", "s3"), Remote: "r", Now: t0}

	// Without Adopt, an unknown certificate is refused and nothing written.
	if err := db.Renew(ctx, renewal); !errors.Is(err, store.ErrCertUnknown) {
		t.Fatalf("unknown certificate: %v", err)
	}
	// Adopt must name the certificate that authenticated, of this device.
	for _, bad := range []store.Cert{cert("dev-1", "other"), cert("dev-2", "s-lost")} {
		r := renewal
		r.Adopt = &bad
		if err := db.Renew(ctx, r); err == nil {
			t.Fatalf("adopted %+v for a renewal by %s of %s", bad, r.OldSerial, r.DeviceID)
		}
	}
	if _, err := db.Cert(ctx, "s3"); !errors.Is(err, store.ErrCertUnknown) {
		t.Fatalf("a refused renewal stored its certificate: %v", err)
	}

	renewal.Adopt = &lost
	if err := db.Renew(ctx, renewal); err != nil {
		t.Fatal(err)
	}
	for _, serial := range []string{"s-lost", "s3"} {
		if c, err := db.Cert(ctx, serial); err != nil || c.DeviceID != "dev-1" {
			t.Errorf("%s: %+v %v", serial, c, err)
		}
	}
	if d, _ := db.Device(ctx, "dev-1"); d.Serial != "s3" {
		t.Errorf("device serial %s, want s3", d.Serial)
	}
	evs, err := db.Audit(ctx, store.AuditFilter{DeviceID: "dev-1"})
	if err != nil || len(evs) < 2 || evs[len(evs)-2].Action != store.ActCertAdopt || evs[len(evs)-2].Serial != "s-lost" ||
		evs[len(evs)-1].Action != store.ActCertRenew {
		t.Fatalf("audit %+v %v", evs, err)
	}

	// A revoked device's certificates are never adopted.
	if _, err := db.RevokeDevice(ctx, "dev-1", "r", t0); err != nil {
		t.Fatal(err)
	}
	gone := cert("dev-1", "s-gone")
	if err := db.Renew(ctx, store.Renewal{DeviceID: "dev-1", OldSerial: "s-gone", Cert: cert("dev-1", "s4"), Now: t0, Adopt: &gone}); !errors.Is(err, store.ErrDeviceRevoked) {
		t.Fatalf("revoked device: %v", err)
	}
	if _, err := db.Cert(ctx, "s-gone"); !errors.Is(err, store.ErrCertUnknown) {
		t.Fatalf("adopted a revoked device's certificate: %v", err)
	}
}
