package enroll

import (
	"context"
	"crypto/x509"
	"maps"
	"math/big"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// gatedStore holds the first Revocations call until released, and counts
// the calls: the CRL rebuilds.
type gatedStore struct {
	*store.DB
	calls   atomic.Int32
	first   chan struct{} // closed when the first call is waiting
	release chan struct{}
}

func (g *gatedStore) Revocations(ctx context.Context) ([]store.Revocation, error) {
	if g.calls.Add(1) == 1 {
		close(g.first)
		<-g.release
	}
	return g.DB.Revocations(ctx)
}

// newCAAndStore returns a generated CA on clock now and an empty store.
func newCAAndStore(tb testing.TB, now func() time.Time) (*CA, *store.DB) {
	tb.Helper()
	ca, err := LoadOrCreateCA(CAConfig{Dir: filepath.Join(tb.TempDir(), "ca"), Now: now})
	if err != nil {
		tb.Fatal(err)
	}
	db, err := store.Open(filepath.Join(tb.TempDir(), "fleet.db"), store.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	return ca, db
}

// Revocations in bulk share CRL rebuilds: the calls made while one runs
// are all answered by the next, which reads the store after them.
func TestRefreshCRLCoalesces(t *testing.T) {
	ca, db := newCAAndStore(t, time.Now)
	st := &gatedStore{DB: db, first: make(chan struct{}), release: make(chan struct{})}
	h, err := NewHandler(Config{CA: ca}, st)
	if err != nil {
		t.Fatal(err)
	}
	const callers = 20
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	wg.Go(func() { errs <- h.RefreshCRL(context.Background()) })
	<-st.first // a rebuild is running
	for range callers - 1 {
		wg.Go(func() { errs <- h.RefreshCRL(context.Background()) })
	}
	for {
		h.genMu.Lock()
		n := h.asked
		h.genMu.Unlock()
		if n == callers {
			break
		}
		// The callers register before they wait for the running rebuild.
		select {
		case err := <-errs:
			t.Fatalf("a call returned before the running rebuild ended: %v", err)
		default:
		}
		runtime.Gosched()
	}
	close(st.release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := st.calls.Load(); got != 2 {
		t.Errorf("%d CRL rebuilds for %d calls, want 2 (the running one, then one for all waiting)", got, callers)
	}
	if der, err := h.currentCRL(context.Background()); err != nil || len(der) == 0 {
		t.Fatalf("CRL: %d bytes, %v", len(der), err)
	}
}

// TestCRLFollowsClockJumps: a CRL the clock says has expired, or is not
// valid yet, is signed anew when asked for, not served until the daily
// refresh.
func TestCRLFollowsClockJumps(t *testing.T) {
	clock := &testClock{t: time.Now().Truncate(time.Second)}
	ca, db := newCAAndStore(t, clock.Now)
	h, err := NewHandler(Config{CA: ca, Now: clock.Now}, db)
	if err != nil {
		t.Fatal(err)
	}
	for _, jump := range []time.Duration{0, 40 * 24 * time.Hour, -time.Hour} {
		clock.t = clock.t.Add(jump)
		der, err := h.currentCRL(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		if clock.t.Before(rl.ThisUpdate) || !clock.t.Before(rl.NextUpdate) {
			t.Errorf("after a jump of %s, the CRL served is valid from %s to %s, not at %s", jump, rl.ThisUpdate, rl.NextUpdate, clock.t)
		}
	}
}

// The CRL lists what the store says is revoked, also what another node
// revoked (the store alone, then a refresh), each at its revocation time,
// and leaves out certificates expired more than a day ago.
func TestCRLFromStore(t *testing.T) {
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second)
	ca, db := newCAAndStore(t, func() time.Time { return now })
	h, err := NewHandler(Config{CA: ca, Now: func() time.Time { return now }}, db)
	if err != nil {
		t.Fatal(err)
	}
	identity := func(id string, serial int64, notAfter, revokedAt time.Time) string {
		t.Helper()
		c := store.Cert{Serial: SerialHex(big.NewInt(serial)), NotBefore: now.Add(-48 * time.Hour), NotAfter: notAfter}
		if err := db.CreateIdentity(ctx, store.Device{ID: id, Role: store.RoleService}, c, "", now.Add(-48*time.Hour)); err != nil {
			t.Fatal(err)
		}
		if !revokedAt.IsZero() {
			if _, err := db.RevokeDevice(ctx, id, "", revokedAt); err != nil {
				t.Fatal(err)
			}
		}
		return c.Serial
	}
	live := identity("live", 0x10, now.Add(time.Hour), now.Add(-time.Minute))
	lately := identity("lately", 0x11, now.Add(-23*time.Hour), now.Add(-30*time.Hour))
	identity("long-ago", 0x12, now.Add(-25*time.Hour), now.Add(-30*time.Hour))
	identity("active", 0x13, now.Add(time.Hour), time.Time{})
	listed := func() map[string]time.Time {
		t.Helper()
		if err := h.RefreshCRL(ctx); err != nil {
			t.Fatal(err)
		}
		der, err := h.currentCRL(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		got := make(map[string]time.Time)
		for _, e := range rl.RevokedCertificateEntries {
			got[SerialHex(e.SerialNumber)] = e.RevocationTime
		}
		return got
	}
	want := map[string]time.Time{live: now.Add(-time.Minute), lately: now.Add(-30 * time.Hour)}
	if got := listed(); !maps.EqualFunc(got, want, time.Time.Equal) {
		t.Errorf("CRL lists %v, want %v", got, want)
	}
	if _, err := db.RevokeDevice(ctx, "active", "", now); err != nil {
		t.Fatal(err)
	}
	want[SerialHex(big.NewInt(0x13))] = now
	if got := listed(); !maps.EqualFunc(got, want, time.Time.Equal) {
		t.Errorf("after a revocation through the store: CRL lists %v, want %v", got, want)
	}
}
