package store_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// TestPruneCerts: records of certificates expired before the cut go, with
// their index and CRL entries, in as many transactions as it takes; each
// identity's current certificate stays whatever its age, and so does
// every certificate not yet past the cut. The fleet goes on: the device
// renews and is revoked as before.
func TestPruneCerts(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	// Each device renewed every day for a while: certificates expiring
	// on days 1..n, the last one current.
	const devices, days = 3, 150
	store.SetCertPruneExamined(t, 40) // many transactions
	var toks []store.Token
	for d := range devices {
		toks = append(toks, store.Token{ID: fmt.Sprintf("t%d", d), Hash: tokenHash(fmt.Sprint(d)), MaxUses: 1, ExpiresAt: t0.Add(time.Hour)})
	}
	mustCreateTokens(t, db, toks...)
	expiring := func(id string, day int) store.Cert {
		c := cert(id, fmt.Sprintf("%x", 0x100000*int(1+id[len(id)-1]-'0')+day)) // dev-N: N+1 in the high digits
		c.NotAfter = t0.Add(time.Duration(day) * 24 * time.Hour)
		return c
	}
	for d := range devices {
		id := fmt.Sprintf("dev-%d", d)
		e := enrollment(tokenHash(fmt.Sprint(d)), id, "")
		e.Cert = expiring(id, 1)
		if err := db.Enroll(ctx, e); err != nil {
			t.Fatal(err)
		}
		for day := 2; day <= days; day++ {
			if err := db.Renew(ctx, store.Renewal{DeviceID: id, OldSerial: expiring(id, day-1).Serial, Cert: expiring(id, day), Now: t0}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// dev-0 is revoked: all its certificates go on the CRL.
	if _, err := db.RevokeDevice(ctx, "dev-0", "", t0); err != nil {
		t.Fatal(err)
	}

	cut := t0.Add(100*24*time.Hour + time.Hour) // days 1..100 are past it
	n, err := db.PruneCerts(ctx, cut)
	if err != nil {
		t.Fatal(err)
	}
	if n != devices*100 {
		t.Fatalf("pruned %d, want %d", n, devices*100)
	}
	for d := range devices {
		id := fmt.Sprintf("dev-%d", d)
		for _, day := range []int{1, 100} {
			if _, err := db.Cert(ctx, expiring(id, day).Serial); !errors.Is(err, store.ErrCertUnknown) {
				t.Errorf("%s day %d: %v, want pruned", id, day, err)
			}
		}
		for _, day := range []int{101, days} {
			if _, err := db.Cert(ctx, expiring(id, day).Serial); err != nil {
				t.Errorf("%s day %d: %v, want kept", id, day, err)
			}
		}
	}
	revoked, err := db.RevokedCerts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(revoked) != days-100 || slices.ContainsFunc(revoked, func(c store.Cert) bool { return c.NotAfter.Before(cut) }) {
		t.Errorf("%d certificates on the CRL, want the %d not past the cut", len(revoked), days-100)
	}
	if n, err := db.PruneCerts(ctx, cut); err != nil || n != 0 {
		t.Errorf("second prune: %d, %v; want nothing", n, err)
	}

	// Past every certificate: the current ones stay.
	if _, err := db.PruneCerts(ctx, t0.Add(10*365*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	for d := range devices {
		id := fmt.Sprintf("dev-%d", d)
		dev, err := db.Device(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Cert(ctx, dev.Serial); err != nil {
			t.Errorf("%s's current certificate: %v", id, err)
		}
	}
	if err := db.Renew(ctx, store.Renewal{DeviceID: "dev-1", OldSerial: expiring("dev-1", days).Serial, Cert: expiring("dev-1", days+1), Now: t0}); err != nil {
		t.Errorf("renew after pruning: %v", err)
	}
	if _, err := db.RevokeDevice(ctx, "dev-2", "", t0); err != nil {
		t.Errorf("revoke after pruning: %v", err)
	}
}
