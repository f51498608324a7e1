package admin

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

func TestTokenInfos(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	devs := map[string]store.Device{
		"pi-1":  {ID: "pi-1", Role: store.RoleDevice},
		"pi-2":  {ID: "pi-2", Role: store.RoleDevice, RevokedAt: now.Add(-time.Hour)},
		"svc-1": {ID: "svc-1", Role: store.RoleService},
	}
	tok := func(id, dev string, reprov bool, age time.Duration) store.Token {
		return store.Token{ID: id, DeviceID: dev, Reprovision: reprov, MaxUses: 1,
			CreatedAt: now.Add(-age), ExpiresAt: now.Add(time.Hour)}
	}
	used := tok("used", "", false, 9*time.Minute)
	used.Uses = 1
	expired := tok("expired", "", false, 8*time.Minute)
	expired.ExpiresAt = now
	revoked := tok("revoked", "pi-1", false, 7*time.Minute)
	revoked.RevokedAt = now
	toks := []store.Token{
		used, expired, revoked,
		tok("free", "", false, 6*time.Minute),
		tok("new-id", "pi-9", false, 5*time.Minute),
		tok("taken", "pi-1", false, 4*time.Minute),
		tok("reprov", "pi-1", true, 3*time.Minute),
		tok("reprov-revoked", "pi-2", true, 2*time.Minute),
		tok("service", "svc-1", true, time.Minute),
	}
	want := []struct{ id, state, why string }{ // newest first
		{"service", TokenUnusable, "svc-1 is a service identity"},
		{"reprov-revoked", TokenUnusable, "pi-2 was revoked"},
		{"reprov", TokenActive, ""},
		{"taken", TokenUnusable, "pi-1 exists; only a re-provisioning token"},
		{"new-id", TokenActive, ""},
		{"free", TokenActive, ""},
		{"revoked", TokenRevoked, ""},
		{"expired", TokenExpired, ""},
		{"used", TokenUsed, ""},
	}
	got := TokenInfos(toks, func(id string) (store.Device, bool) { d, ok := devs[id]; return d, ok }, now)
	if len(got) != len(want) {
		t.Fatalf("%d infos, want %d", len(got), len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.ID != w.id || g.State != w.state || !strings.HasPrefix(g.Why, w.why) || (w.why == "") != (g.Why == "") {
			t.Errorf("#%d: %s %s %q, want %s %s %q…", i, g.ID, g.State, g.Why, w.id, w.state, w.why)
		}
	}
}

// The next batch starts after the ids of the last one, enrolled or not:
// a production line mints a batch and the next long before the first is
// enrolled. The id_taken hint once counted enrolled ids only, and its
// --start minted second tokens for ids whose first was already on a
// device.
func TestBatchHintSkipsLiveTokens(t *testing.T) {
	ctx := context.Background()
	h, db, clock := newStoreHandler(t)
	now := *clock
	batch, err := h.MintTokens(ctx, TokenRequest{Count: 5, Prefix: "pi-"}, "test")
	if err != nil {
		t.Fatal(err)
	}
	// pi-0002 enrolls, pi-0001's and pi-0003's tokens stay live, and
	// pi-0004's and pi-0005's are revoked: those ids are free again.
	enrolled := batch[1].Token
	err = db.Enroll(ctx, store.Enrollment{
		TokenHash: enrolled.Hash, Device: store.Device{ID: enrolled.DeviceID, Role: store.RoleDevice},
		Cert: store.Cert{Serial: "1a", DeviceID: enrolled.DeviceID, NotBefore: now, NotAfter: now.Add(time.Hour), DER: []byte("der")},
		Now:  now,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range batch[3:] {
		if _, err := h.RevokeToken(ctx, tk.ID, "test"); err != nil {
			t.Fatal(err)
		}
	}
	late, err := h.MintTokens(ctx, TokenRequest{Count: 1, Prefix: "pi-", Start: 9, TTL: "1h"}, "test")
	if err != nil {
		t.Fatal(err)
	}
	*clock = now.Add(2 * time.Hour) // pi-0009's token has expired

	_, err = h.MintTokens(ctx, TokenRequest{Count: 3, Prefix: "pi-"}, "test")
	if err == nil || !strings.Contains(err.Error(), "--start 4 ") {
		t.Fatalf("batch over pi-0002: %v, want the hint --start 4 (after pi-0003's live token; not after the revoked ones nor %s's expired one)", err, late[0].DeviceID)
	}
}

// newStoreHandler is a Handler over a real store and CA in t.TempDir(),
// whose clock the test sets through the pointer returned.
func newStoreHandler(t *testing.T) (*Handler, *store.DB, *time.Time) {
	t.Helper()
	db, err := store.Open(filepath.Join(t.TempDir(), "fleetmq.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	now := new(time.Time)
	*now = time.Now()
	h, err := New(Config{CA: ca, Now: func() time.Time { return *now }}, db)
	if err != nil {
		t.Fatal(err)
	}
	return h, db, now
}

// A batch that reaches a revoked id or a service's name also says where
// the next batch starts; it said "bind the token to a new id", advice for
// one token, not for a prefix and a count.
func TestBatchOverAnyTakenIDSaysWhereToStart(t *testing.T) {
	ctx := context.Background()
	h, db, clock := newStoreHandler(t)
	now := *clock
	crt := func(id, serial string) store.Cert {
		return store.Cert{Serial: serial, DeviceID: id, NotBefore: now, NotAfter: now.Add(time.Hour), DER: []byte("der")}
	}
	if err := db.CreateIdentity(ctx, store.Device{ID: "svc-0002", Role: store.RoleService}, crt("svc-0002", "2a"), "test", now); err != nil {
		t.Fatal(err)
	}
	toks, err := h.MintTokens(ctx, TokenRequest{DeviceID: "pi-0002"}, "test")
	if err != nil {
		t.Fatal(err)
	}
	err = db.Enroll(ctx, store.Enrollment{TokenHash: toks[0].Hash, Device: store.Device{ID: "pi-0002", Role: store.RoleDevice}, Cert: crt("pi-0002", "1a"), Now: now})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.RevokeDevice(ctx, "pi-0002", "test"); err != nil {
		t.Fatal(err)
	}
	for _, prefix := range []string{"pi-", "svc-"} {
		_, err := h.MintTokens(ctx, TokenRequest{Count: 3, Prefix: prefix}, "test")
		if err == nil || !strings.Contains(err.Error(), "--start 3 ") || strings.Contains(err.Error(), "bind the token") {
			t.Errorf("batch %s0001 … over %s0002: %v, want the hint --start 3", prefix, prefix, err)
		}
	}
	// One token keeps its own advice.
	if _, err := h.MintTokens(ctx, TokenRequest{DeviceID: "pi-0002"}, "test"); err == nil || !strings.Contains(err.Error(), "bind the token to a new id") {
		t.Errorf("one token for revoked pi-0002: %v", err)
	}
}

// Replace names the ids whose tokens it revokes: a free token has none,
// and a request that asked to replace one is refused rather than taken
// to have revoked something.
func TestReplaceNeedsAnID(t *testing.T) {
	h, _, _ := newStoreHandler(t)
	_, err := h.MintTokens(context.Background(), TokenRequest{Replace: true}, "test")
	if e := enroll.AsError(err); e == nil || e.Code != enroll.CodeBadRequest || !strings.Contains(e.Message, "replace needs device_id or count") {
		t.Fatalf("free token with replace: %v", err)
	}
}
