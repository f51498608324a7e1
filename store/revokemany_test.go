package store_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
	"github.com/fleetmq/fleetmq/store/storetest"
)

func TestRevokeDevices(t *testing.T) {
	ctx := context.Background()
	db := fixture(t)
	later := t0.Add(time.Hour)
	if err := db.Renew(ctx, store.Renewal{DeviceID: "d1", OldSerial: "s1", Cert: cert("d1", "s1b"), Now: t0}); err != nil {
		t.Fatal(err)
	}

	// One unknown id refuses the whole list, and names every unknown one.
	_, err := db.RevokeDevices(ctx, []string{"d1", "ghost-1", "d2", "ghost-2"}, "admin", later)
	var unknown *store.UnknownIDsError
	if !errors.As(err, &unknown) || !errors.Is(err, store.ErrNotFound) || !slices.Equal(unknown.IDs, []string{"ghost-1", "ghost-2"}) {
		t.Fatalf("unknown ids: %v", err)
	}
	for _, id := range []string{"d1", "d2"} {
		if d, err := db.Device(ctx, id); err != nil || d.Revoked() {
			t.Fatalf("%s after a refused list: %+v %v", id, d, err)
		}
	}

	// An id already revoked is reported, not refused; a repeated id
	// counts once; a service is revoked as a device is.
	got, err := db.RevokeDevices(ctx, []string{"d2", "d-rev", "d1", "d2", "svc"}, "admin", later)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range got {
		ids = append(ids, r.ID)
	}
	if !slices.Equal(ids, []string{"d2", "d-rev", "d1", "svc"}) {
		t.Fatalf("results for %v, want d2 d-rev d1 svc", ids)
	}
	if !got[1].Before.Equal(t0) || len(got[1].Certs) != 0 {
		t.Errorf("d-rev, revoked at %v before: %+v", t0, got[1])
	}
	for i, want := range [][]string{{"s2"}, nil, {"s1", "s1b"}, {"s-svc"}} {
		if s := serials(got[i].Certs); !slices.Equal(s, want) {
			t.Errorf("%s: certificates revoked %v, want %v", got[i].ID, s, want)
		}
		if i != 1 && !got[i].Before.IsZero() {
			t.Errorf("%s reported as revoked before: %+v", got[i].ID, got[i])
		}
	}
	for _, id := range []string{"d1", "d2", "svc"} {
		if d, err := db.Device(ctx, id); err != nil || !d.RevokedAt.Equal(later) {
			t.Errorf("%s after revocation: %+v %v", id, d, err)
		}
	}
	if d, err := db.Device(ctx, "d-rev"); err != nil || !d.RevokedAt.Equal(t0) {
		t.Errorf("d-rev's revocation time changed: %+v %v", d, err)
	}
	rev := checkRevocations(t, db)
	for _, s := range []string{"s1", "s1b", "s2", "s-svc"} {
		if !slices.ContainsFunc(rev, func(r store.Revocation) bool { return r.Serial == s && r.RevokedAt.Equal(later) }) {
			t.Errorf("serial %s not in the CRL index: %+v", s, rev)
		}
	}

	// One audit event per identity revoked now, none for d-rev.
	if got := storetest.Audited(t, db, store.ActDeviceRevoke, later); !slices.Equal(got, []string{"d1", "d2", "svc"}) {
		t.Errorf("device.revoke events for %v, want d1 d2 svc", got)
	}
}
