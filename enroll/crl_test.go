package enroll

import (
	"context"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/fleetmq/fleetmq/store"
)

// gatedStore holds the first RevokedCerts call until released, and counts
// the calls: the CRL rebuilds.
type gatedStore struct {
	*store.DB
	calls   atomic.Int32
	first   chan struct{} // closed when the first call is waiting
	release chan struct{}
}

func (g *gatedStore) RevokedCerts(ctx context.Context) ([]store.Cert, error) {
	if g.calls.Add(1) == 1 {
		close(g.first)
		<-g.release
	}
	return g.DB.RevokedCerts(ctx)
}

// Revocations in bulk share CRL rebuilds: the calls made while one runs
// are all answered by the next, which reads the store after them.
func TestRefreshCRLCoalesces(t *testing.T) {
	ca, err := LoadOrCreateCA(CAConfig{Dir: filepath.Join(t.TempDir(), "ca")})
	if err != nil {
		t.Fatal(err)
	}
	db, err := store.Open(filepath.Join(t.TempDir(), "fleet.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
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
