package admin

import (
	"strings"
	"testing"
	"time"

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
