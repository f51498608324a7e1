package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
	"github.com/fleetmq/fleetmq/store/storetest"
)

func boundToken(id, device string) store.Token {
	return store.Token{ID: id, Hash: tokenHash(id), MaxUses: 1, DeviceID: device, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}
}

// Two creates for one id at once: the check and the write are one
// transaction, so exactly one of them gets the id.
func TestConcurrentTokensForOneID(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	const n = 8
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			errs <- db.CreateTokens(ctx, []store.Token{boundToken(fmt.Sprint("t", i), "pi-1")}, "admin", t0)
		})
	}
	wg.Wait()
	close(errs)
	ok := 0
	for err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, store.ErrTokenLive):
			t.Errorf("create: %v, want ErrTokenLive", err)
		}
	}
	toks, err := db.Tokens(ctx)
	if ok != 1 || err != nil || len(toks) != 1 {
		t.Fatalf("%d creates succeeded, %d tokens stored (%v), want 1", ok, len(toks), err)
	}
}

// A token, a batch or a service name for an id a usable token is bound
// to is refused, and nothing of it is written; tokens that can no longer
// enroll the id are no rivals.
func TestLiveTokenRefusals(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	expired := boundToken("expired", "pi-4")
	expired.ExpiresAt = t0
	mustCreateTokens(t, db, boundToken("live3", "pi-3"), boundToken("live5", "pi-5"), expired,
		boundToken("revoked", "pi-6"), boundToken("enrolls", "pi-7"))
	if _, err := db.RevokeToken(ctx, "revoked", "admin", t0); err != nil {
		t.Fatal(err)
	}
	if err := db.Enroll(ctx, enrollment(tokenHash("enrolls"), "pi-7", "s7")); err != nil {
		t.Fatal(err)
	}
	before, _ := db.Tokens(ctx)

	err := db.CreateTokens(ctx, []store.Token{boundToken("n2", "pi-2"), boundToken("n3", "pi-3"), boundToken("n5", "pi-5")}, "admin", t0)
	var live *store.LiveTokensError
	if !errors.As(err, &live) || len(live.Tokens) != 2 || live.Tokens[0].ID != "live3" || live.Tokens[1].ID != "live5" {
		t.Fatalf("batch over pi-3 and pi-5: %v, want both live tokens named", err)
	}
	if !live.Tokens[0].ExpiresAt.Equal(t0.Add(time.Hour)) {
		t.Errorf("the live token's expiry is lost: %+v", live.Tokens[0])
	}
	err = db.CreateIdentity(ctx, store.Device{ID: "pi-3", Role: store.RoleService}, cert("pi-3", "s-svc"), "admin", t0)
	if !errors.Is(err, store.ErrTokenLive) {
		t.Fatalf("service over a live token: %v", err)
	}
	if _, err := db.Device(ctx, "pi-3"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("refused service stored: %v", err)
	}
	if after, _ := db.Tokens(ctx); len(after) != len(before) {
		t.Fatalf("%d tokens after the refusals, %d before", len(after), len(before))
	}

	// Expired and revoked tokens leave their ids free; so does a plain
	// token whose id was enrolled, for a re-provisioning token.
	reprov := boundToken("reprov7", "pi-7")
	reprov.Reprovision = true
	mustCreateTokens(t, db, boundToken("n4", "pi-4"), boundToken("n6", "pi-6"), reprov)
	reprov2 := reprov
	reprov2.ID, reprov2.Hash = "reprov7b", tokenHash("reprov7b")
	if err := db.CreateTokens(ctx, []store.Token{reprov2}, "admin", t0); !errors.Is(err, store.ErrTokenLive) {
		t.Fatalf("second re-provisioning token for pi-7: %v", err)
	}
}

// ReplaceTokens revokes the usable tokens of the ids in the transaction
// that stores the new ones, and says so in the audit log.
func TestReplaceTokens(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	mustCreateTokens(t, db, boundToken("old", "pi-1"))
	if err := db.ReplaceTokens(ctx, []store.Token{boundToken("new", "pi-1"), boundToken("other", "pi-2")}, "admin", t0); err != nil {
		t.Fatal(err)
	}
	old, err := db.TokenByHash(ctx, tokenHash("old"))
	if err != nil || !errors.Is(old.Check(t0), store.ErrTokenRevoked) {
		t.Fatalf("replaced token: %+v %v", old, err)
	}
	if tok, err := db.TokenByHash(ctx, tokenHash("new")); err != nil || tok.Check(t0) != nil {
		t.Fatalf("new token: %+v %v", tok, err)
	}
	evs, err := db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, ev := range evs {
		found = found || ev.Action == store.ActTokenRevoke && ev.TokenID == "old" && ev.Detail == "replaced by token new"
	}
	if !found || countAction(evs, store.ActTokenCreate) != 3 {
		t.Fatalf("audit %+v", evs)
	}
}

// Records are matched to ids before they are decoded: a free token's
// label named device_id is no binding, and a bound token's is not its id.
func TestLiveTokenLabelNamedDeviceID(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	free := boundToken("free", "")
	free.Labels = map[string]string{"device_id": "pi-1"}
	bound := boundToken("bound", "pi-2")
	bound.Labels = map[string]string{"device_id": "pi-3"}
	mustCreateTokens(t, db, free, bound)
	if err := db.CreateTokens(ctx, []store.Token{boundToken("n1", "pi-1"), boundToken("n3", "pi-3")}, "admin", t0); err != nil {
		t.Fatalf("ids only named by labels: %v", err)
	}
	if err := db.CreateTokens(ctx, []store.Token{boundToken("n2", "pi-2")}, "admin", t0); !errors.Is(err, store.ErrTokenLive) {
		t.Fatalf("pi-2, bound beside a label: %v", err)
	}
}

// A free token does not enroll an id a usable token is bound to: the
// device that token was minted for would find it unusable in the field.
// Nothing is written and the free token keeps its uses; the bound token
// still enrolls its id, and tokens that can no longer enroll their ids
// reserve nothing.
func TestFreeTokenRefusedAReservedID(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	free := boundToken("free", "")
	free.MaxUses = 2
	expired := boundToken("expired", "pi-3")
	expired.ExpiresAt = t0
	mustCreateTokens(t, db, free, boundToken("bound", "pi-1"), boundToken("revoked", "pi-2"), expired)
	if _, err := db.RevokeToken(ctx, "revoked", "admin", t0); err != nil {
		t.Fatal(err)
	}
	before := storetest.FleetState(t, db)
	err := db.Enroll(ctx, enrollment(tokenHash("free"), "pi-1", "s1"))
	var live *store.LiveTokensError
	if !errors.As(err, &live) || len(live.Tokens) != 1 || live.Tokens[0].ID != "bound" {
		t.Fatalf("free token enrolling pi-1: %v, want the bound token named", err)
	}
	if after := storetest.FleetState(t, db); after != before {
		t.Fatal("the refused enrollment changed the store")
	}
	if err := db.Enroll(ctx, enrollment(tokenHash("bound"), "pi-1", "s1")); err != nil {
		t.Fatalf("the bound token enrolling its id: %v", err)
	}
	// Both uses are left: the refusal spent none.
	for _, id := range []string{"pi-2", "pi-3"} {
		if err := db.Enroll(ctx, enrollment(tokenHash("free"), id, "s-"+id)); err != nil {
			t.Fatalf("free token enrolling %s, whose token cannot enroll it: %v", id, err)
		}
	}
}

// Minting a token for an id and a free token enrolling it, at once: the
// check and the write are one transaction either way, so one of them wins.
func TestFreeEnrollRacesTokenForItsID(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	const n = 8
	free := boundToken("free", "")
	free.MaxUses = n
	mustCreateTokens(t, db, free)
	var wg sync.WaitGroup
	minted, enrolled := make([]error, n), make([]error, n)
	for i := range n {
		id := fmt.Sprint("pi-", i)
		wg.Go(func() {
			minted[i] = db.CreateTokens(ctx, []store.Token{boundToken(fmt.Sprint("b", i), id)}, "admin", t0)
		})
		wg.Go(func() { enrolled[i] = db.Enroll(ctx, enrollment(tokenHash("free"), id, fmt.Sprint("s", i))) })
	}
	wg.Wait()
	for i := range n {
		if (minted[i] == nil) == (enrolled[i] == nil) {
			t.Errorf("pi-%d: mint %v, free enrollment %v: want exactly one to succeed", i, minted[i], enrolled[i])
		}
	}
}
