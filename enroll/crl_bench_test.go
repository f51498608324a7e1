package enroll

import (
	"context"
	"fmt"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// BenchmarkRevokeAndRefreshCRL is what `fleetmq device revoke` costs the
// server with n certificates already revoked: the revocation's commit,
// then the CRL rebuild that follows it.
func BenchmarkRevokeAndRefreshCRL(b *testing.B) {
	for _, n := range []int{0, 1000, 5000} {
		b.Run(fmt.Sprintf("revoked=%d", n), func(b *testing.B) {
			ctx := context.Background()
			ca, db := newCAAndStore(b, time.Now)
			h, err := NewHandler(Config{CA: ca}, db)
			if err != nil {
				b.Fatal(err)
			}
			leaf, err := ca.IssueDevice(&genP256(b).PublicKey, "bench", time.Hour)
			if err != nil {
				b.Fatal(err)
			}
			// Records as large as real ones; the serials only have to differ.
			next := 0
			add := func() string {
				next++
				id := fmt.Sprintf("svc-%06d", next)
				c := store.Cert{Serial: SerialHex(big.NewInt(int64(1<<32 + next))), NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter, DER: leaf.Raw}
				if err := db.CreateIdentity(ctx, store.Device{ID: id, Role: store.RoleService}, c, "", time.Now()); err != nil {
					b.Fatal(err)
				}
				return id
			}
			ids := make(chan string, n)
			for range n {
				ids <- add()
			}
			close(ids)
			var wg sync.WaitGroup
			for range 16 { // concurrent, to share commits
				wg.Go(func() {
					for id := range ids {
						if _, err := db.RevokeDevice(ctx, id, "", time.Now()); err != nil {
							b.Error(err)
						}
					}
				})
			}
			wg.Wait()
			for b.Loop() {
				b.StopTimer()
				id := add()
				b.StartTimer()
				if _, err := db.RevokeDevice(ctx, id, "", time.Now()); err != nil {
					b.Fatal(err)
				}
				if err := h.RefreshCRL(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
