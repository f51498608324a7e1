package store_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

func tokenHash(secret string) [32]byte { return sha256.Sum256([]byte(secret)) }

func mustCreateTokens(tb testing.TB, db *store.DB, toks ...store.Token) {
	tb.Helper()
	for i := range toks {
		if toks[i].CreatedAt.IsZero() {
			toks[i].CreatedAt = t0
		}
	}
	if err := db.CreateTokens(context.Background(), toks, "127.0.0.1", t0); err != nil {
		tb.Fatalf("create tokens: %v", err)
	}
}

func cert(id, serial string) store.Cert {
	return store.Cert{
		Serial:    serial,
		DeviceID:  id,
		NotBefore: t0.Add(-time.Minute),
		NotAfter:  t0.Add(24 * time.Hour),
		DER:       []byte("der of " + serial + "\x00\xff"),
	}
}

func enrollment(hash [32]byte, id, serial string) store.Enrollment {
	return store.Enrollment{
		TokenHash: hash,
		Device:    store.Device{ID: id, Role: store.RoleDevice, Labels: map[string]string{"site": "a"}},
		Cert:      cert(id, serial),
		Remote:    "10.0.0.1:1234",
		Now:       t0,
	}
}

func TestEnrollRaceSingleUse(t *testing.T) {
	for _, maxUses := range []int{1, 3} {
		t.Run(fmt.Sprint("max_uses=", maxUses), func(t *testing.T) {
			ctx := context.Background()
			db := store.OpenTest(t)
			hash := tokenHash("race")
			mustCreateTokens(t, db, store.Token{ID: "race", Hash: hash, MaxUses: maxUses, ExpiresAt: t0.Add(time.Hour)})

			const n = 50
			start := make(chan struct{})
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					<-start
					errs[i] = db.Enroll(ctx, enrollment(hash, fmt.Sprint("dev-", i), fmt.Sprint("serial-", i)))
				})
			}
			close(start)
			wg.Wait()

			ok := 0
			for i, err := range errs {
				switch {
				case err == nil:
					ok++
				case !errors.Is(err, store.ErrTokenUsed):
					t.Errorf("enroll %d: %v, want nil or ErrTokenUsed", i, err)
				}
			}
			if ok != maxUses {
				t.Fatalf("%d enrollments succeeded, want %d", ok, maxUses)
			}
			tok, err := db.TokenByHash(ctx, hash)
			if err != nil || tok.Uses != maxUses {
				t.Fatalf("token %+v %v, want %d uses", tok, err, maxUses)
			}
			devs, err := db.Devices(ctx)
			if err != nil || len(devs) != maxUses {
				t.Fatalf("devices %v %v, want %d", devs, err, maxUses)
			}
			certs := 0
			for i := range n {
				c, err := db.Cert(ctx, fmt.Sprint("serial-", i))
				switch {
				case err == nil:
					certs++
					if c.DeviceID != fmt.Sprint("dev-", i) || errs[i] != nil {
						t.Errorf("cert %d %+v belongs to a failed enrollment (%v)", i, c, errs[i])
					}
				case !errors.Is(err, store.ErrCertUnknown):
					t.Fatal(err)
				}
			}
			if certs != maxUses {
				t.Fatalf("%d certs stored, want %d", certs, maxUses)
			}
			evs, err := db.Audit(ctx, store.AuditFilter{})
			if err != nil {
				t.Fatal(err)
			}
			if uses := countAction(evs, store.ActTokenUse); uses != maxUses {
				t.Fatalf("%d token.use audit events, want %d", uses, maxUses)
			}
		})
	}
}

func countAction(evs []store.AuditEvent, action string) int {
	n := 0
	for _, ev := range evs {
		if ev.Action == action {
			n++
		}
	}
	return n
}

func TestEnrollRenewRevoke(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	hash := tokenHash("free")
	bound := tokenHash("bound")
	mustCreateTokens(t, db,
		store.Token{ID: "free", Hash: hash, MaxUses: 2, ExpiresAt: t0.Add(time.Hour), Labels: map[string]string{"k": "v"}},
		store.Token{ID: "bound", Hash: bound, DeviceID: "pinned", MaxUses: 1, ExpiresAt: t0.Add(time.Hour)},
	)

	e := enrollment(hash, "dev-1", "s1")
	e.Device.Role = store.RoleOperator // ignored: enrollment only makes devices
	if err := db.Enroll(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := db.Enroll(ctx, enrollment(bound, "pinned", "s-pinned")); err != nil {
		t.Fatalf("enroll with bound token: %v", err)
	}
	d, err := db.Device(ctx, "dev-1")
	if err != nil {
		t.Fatal(err)
	}
	want := store.Device{ID: "dev-1", Role: store.RoleDevice, CreatedAt: t0, Labels: map[string]string{"site": "a"},
		Serial: "s1", NotAfter: t0.Add(24 * time.Hour), TokenID: "free"}
	if !equalDevice(d, want) {
		t.Fatalf("device %+v\nwant %+v", d, want)
	}
	c, err := db.Cert(ctx, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c.DER, cert("dev-1", "s1").DER) || c.DeviceID != "dev-1" || !c.IssuedAt.Equal(t0) || c.Revoked() {
		t.Fatalf("cert %+v", c)
	}

	later := t0.Add(time.Hour)
	err = db.Renew(ctx, store.Renewal{DeviceID: "dev-1", OldSerial: "s1", Cert: cert("dev-1", "s2"), Remote: "r", Now: later})
	if err != nil {
		t.Fatal(err)
	}
	d, err = db.Device(ctx, "dev-1")
	if err != nil {
		t.Fatal(err)
	}
	if d.Serial != "s2" || !d.LastRenewal.Equal(later) || !d.CreatedAt.Equal(t0) {
		t.Fatalf("after renewal %+v", d)
	}

	revoked, err := db.RevokeDevice(ctx, "dev-1", "admin", later)
	if err != nil {
		t.Fatal(err)
	}
	if got := serials(revoked); !slices.Equal(got, []string{"s1", "s2"}) {
		t.Fatalf("revoked %v, want s1 s2", got)
	}
	for _, c := range revoked {
		if !c.RevokedAt.Equal(later) || len(c.DER) == 0 {
			t.Fatalf("revoked cert %+v", c)
		}
	}
	crl, err := db.RevokedCerts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := serials(crl); !slices.Equal(got, []string{"s1", "s2"}) {
		t.Fatalf("revoked certs %v, want s1 s2", got)
	}
	if d, err := db.Device(ctx, "dev-1"); err != nil || !d.RevokedAt.Equal(later) {
		t.Fatalf("device after revoke %+v %v", d, err)
	}
	if c, err := db.Cert(ctx, "s-pinned"); err != nil || c.Revoked() {
		t.Fatalf("other device's cert %+v %v", c, err)
	}

	evs, err := db.Audit(ctx, store.AuditFilter{DeviceID: "dev-1"})
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, ev := range evs {
		actions = append(actions, ev.Action)
	}
	wantActions := []string{store.ActTokenUse, store.ActCertIssue, store.ActCertRenew, store.ActDeviceRevoke}
	if !slices.Equal(actions, wantActions) {
		t.Fatalf("audit %v, want %v", actions, wantActions)
	}
	if ev := evs[1]; ev.Serial != "s1" || ev.TokenID != "free" || ev.Remote != "10.0.0.1:1234" {
		t.Fatalf("cert.issue event %+v", ev)
	}
	if ev := evs[3]; ev.Detail != "2 certificate(s) revoked: s1 s2" {
		t.Fatalf("device.revoke event names %q, want both certificates", ev.Detail)
	}
}

func serials(cs []store.Cert) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Serial)
	}
	slices.Sort(out)
	return out
}

func equalDevice(a, b store.Device) bool {
	return a.ID == b.ID && a.Role == b.Role && a.CreatedAt.Equal(b.CreatedAt) && maps.Equal(a.Labels, b.Labels) &&
		a.Serial == b.Serial && a.NotAfter.Equal(b.NotAfter) && a.LastRenewal.Equal(b.LastRenewal) &&
		a.RevokedAt.Equal(b.RevokedAt) && a.TokenID == b.TokenID
}

func TestTokens(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	mustCreateTokens(t, db,
		store.Token{ID: "b", Hash: tokenHash("b"), MaxUses: 1, ExpiresAt: t0.Add(time.Hour), CreatedAt: t0},
		store.Token{ID: "a", Hash: tokenHash("a"), MaxUses: 1, ExpiresAt: t0.Add(time.Hour), CreatedAt: t0},
		store.Token{ID: "c", Hash: tokenHash("c"), MaxUses: 1, ExpiresAt: t0.Add(time.Hour), CreatedAt: t0.Add(-time.Second)},
	)
	toks, err := db.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, tok := range toks {
		ids = append(ids, tok.ID)
		if tok.Hash != tokenHash(tok.ID) {
			t.Errorf("token %s has the wrong hash", tok.ID)
		}
	}
	if !slices.Equal(ids, []string{"c", "a", "b"}) {
		t.Fatalf("order %v, want c a b", ids)
	}
	tok, err := db.RevokeToken(ctx, "a", "admin", t0)
	if err != nil || !tok.RevokedAt.Equal(t0) {
		t.Fatalf("revoke: %+v %v", tok, err)
	}
	if tok, err := db.TokenByHash(ctx, tokenHash("a")); err != nil || !tok.RevokedAt.Equal(t0) || tok.ID != "a" {
		t.Fatalf("after revoke %+v %v", tok, err)
	}
	evs, err := db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if countAction(evs, store.ActTokenCreate) != 3 || countAction(evs, store.ActTokenRevoke) != 1 {
		t.Fatalf("audit %+v", evs)
	}
}

// fixture builds a store with one example of every state the error cases
// need.
func fixture(t *testing.T) *store.DB {
	t.Helper()
	ctx := context.Background()
	db := store.OpenTest(t)
	exp := t0.Add(time.Hour)
	mustCreateTokens(t, db,
		store.Token{ID: "fresh", Hash: tokenHash("fresh"), MaxUses: 10, ExpiresAt: exp},
		store.Token{ID: "expired", Hash: tokenHash("expired"), MaxUses: 1, ExpiresAt: t0},
		store.Token{ID: "revoked", Hash: tokenHash("revoked"), MaxUses: 1, ExpiresAt: exp},
		store.Token{ID: "used", Hash: tokenHash("used"), MaxUses: 1, ExpiresAt: exp},
		store.Token{ID: "bound", Hash: tokenHash("bound"), MaxUses: 1, ExpiresAt: exp, DeviceID: "pinned"},
	)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(db.Enroll(ctx, enrollment(tokenHash("used"), "d-used", "s-used")))
	must(db.Enroll(ctx, enrollment(tokenHash("fresh"), "d1", "s1")))
	must(db.Enroll(ctx, enrollment(tokenHash("fresh"), "d2", "s2")))
	must(db.Enroll(ctx, enrollment(tokenHash("fresh"), "d-rev", "s-rev")))
	must(db.Enroll(ctx, enrollment(tokenHash("fresh"), "d-certrev", "s-certrev-old")))
	must(db.Renew(ctx, store.Renewal{DeviceID: "d-certrev", OldSerial: "s-certrev-old", Cert: cert("d-certrev", "s-certrev"), Now: t0}))
	store.RevokeCertOnly(t, db, "s-certrev-old", t0)
	_, err := db.RevokeDevice(ctx, "d-rev", "admin", t0)
	must(err)
	_, err = db.RevokeToken(ctx, "revoked", "admin", t0)
	must(err)
	must(db.CreateIdentity(ctx, store.Device{ID: "svc", Role: store.RoleService}, cert("svc", "s-svc"), "admin", t0))
	// A token bound to an id that was enrolled meanwhile (by the token
	// itself: a free token may not take it), and a re-provisioning token
	// whose device was revoked meanwhile.
	mustCreateTokens(t, db, store.Token{ID: "bound-early", Hash: tokenHash("bound-early"), MaxUses: 2, ExpiresAt: exp, DeviceID: "d-race"})
	must(db.Enroll(ctx, enrollment(tokenHash("bound-early"), "d-race", "s-race")))
	mustCreateTokens(t, db, store.Token{ID: "reprov-rev", Hash: tokenHash("reprov-rev"), MaxUses: 1, ExpiresAt: exp, DeviceID: "d-race", Reprovision: true})
	_, err = db.RevokeDevice(ctx, "d-race", "admin", t0)
	must(err)
	return db
}

func TestRefusedRequestsWriteNothing(t *testing.T) {
	ctx := context.Background()
	exp := t0.Add(time.Hour)
	renewal := func(id, old, serial string) store.Renewal {
		return store.Renewal{DeviceID: id, OldSerial: old, Cert: cert(id, serial), Now: t0}
	}
	cases := []struct {
		name string
		do   func(db *store.DB) error
		want error
	}{
		{"enroll unknown token", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("nope"), "n1", "sn1"))
		}, store.ErrTokenUnknown},
		{"enroll expired token", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("expired"), "n1", "sn1"))
		}, store.ErrTokenExpired},
		{"enroll revoked token", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("revoked"), "n1", "sn1"))
		}, store.ErrTokenRevoked},
		{"enroll used token", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("used"), "n1", "sn1"))
		}, store.ErrTokenUsed},
		{"enroll bound token, other id", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("bound"), "n1", "sn1"))
		}, store.ErrTokenBound},
		{"enroll existing device", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("fresh"), "d1", "sn1"))
		}, store.ErrDeviceExists},
		{"enroll revoked device's id", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("fresh"), "d-rev", "sn1"))
		}, store.ErrIDRevoked}, // which is also ErrDeviceExists
		{"enroll service's id", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("fresh"), "svc", "sn1"))
		}, store.ErrDeviceExists},
		{"enroll existing serial", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("fresh"), "n1", "s1"))
		}, store.ErrCertExists},
		{"enroll cert of other id", func(db *store.DB) error {
			e := enrollment(tokenHash("fresh"), "n1", "sn1")
			e.Cert.DeviceID = "n2"
			return db.Enroll(ctx, e)
		}, store.ErrCertMismatch},
		{"renew unknown device", func(db *store.DB) error {
			return db.Renew(ctx, renewal("nobody", "s1", "sn1"))
		}, store.ErrNotFound},
		{"renew revoked device", func(db *store.DB) error {
			return db.Renew(ctx, renewal("d-rev", "s-rev", "sn1"))
		}, store.ErrDeviceRevoked},
		{"renew unknown serial", func(db *store.DB) error {
			return db.Renew(ctx, renewal("d1", "s-nope", "sn1"))
		}, store.ErrCertUnknown},
		{"renew with other device's cert", func(db *store.DB) error {
			return db.Renew(ctx, renewal("d1", "s2", "sn1"))
		}, store.ErrCertMismatch},
		{"renew with revoked cert", func(db *store.DB) error {
			return db.Renew(ctx, renewal("d-certrev", "s-certrev-old", "sn1"))
		}, store.ErrCertRevoked},
		{"renew to existing serial", func(db *store.DB) error {
			return db.Renew(ctx, renewal("d1", "s1", "s2"))
		}, store.ErrCertExists},
		{"revoke unknown device", func(db *store.DB) error {
			_, err := db.RevokeDevice(ctx, "nobody", "admin", t0)
			return err
		}, store.ErrNotFound},
		{"revoke revoked device", func(db *store.DB) error {
			_, err := db.RevokeDevice(ctx, "d-rev", "admin", t0)
			return err
		}, store.ErrDeviceRevoked},
		{"revoke devices, one unknown", func(db *store.DB) error {
			_, err := db.RevokeDevices(ctx, []string{"d1", "d2", "nobody", "d-rev", "svc"}, "admin", t0)
			return err
		}, store.ErrNotFound},
		{"revoke unknown token", func(db *store.DB) error {
			_, err := db.RevokeToken(ctx, "nope", "admin", t0)
			return err
		}, store.ErrNotFound},
		{"revoke revoked token", func(db *store.DB) error {
			_, err := db.RevokeToken(ctx, "revoked", "admin", t0)
			return err
		}, store.ErrTokenRevoked},
		{"create tokens, one hash exists", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{
				{ID: "new", Hash: tokenHash("new"), MaxUses: 1, ExpiresAt: exp},
				{ID: "fresh2", Hash: tokenHash("fresh"), MaxUses: 1, ExpiresAt: exp},
			}, "admin", t0)
		}, store.ErrTokenExists},
		{"create tokens, one id exists", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{
				{ID: "new", Hash: tokenHash("new"), MaxUses: 1, ExpiresAt: exp},
				{ID: "fresh", Hash: tokenHash("other"), MaxUses: 1, ExpiresAt: exp},
			}, "admin", t0)
		}, store.ErrTokenExists},
		{"create tokens, one bound to an existing device", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{
				{ID: "new", Hash: tokenHash("new"), MaxUses: 1, ExpiresAt: exp},
				{ID: "new-d1", Hash: tokenHash("new-d1"), DeviceID: "d1", MaxUses: 1, ExpiresAt: exp},
			}, "admin", t0)
		}, store.ErrDeviceExists},
		{"create token bound to a revoked device", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{
				{ID: "new-rev", Hash: tokenHash("new-rev"), DeviceID: "d-rev", MaxUses: 1, ExpiresAt: exp},
			}, "admin", t0)
		}, store.ErrDeviceExists},
		{"enroll with a token bound to an id taken meanwhile", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("bound-early"), "d-race", "sn1"))
		}, store.ErrDeviceExists},
		{"re-provision a device revoked after the token was made", func(db *store.DB) error {
			return db.Enroll(ctx, enrollment(tokenHash("reprov-rev"), "d-race", "sn1"))
		}, store.ErrDeviceRevoked},
		{"create re-provisioning token for a revoked device", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{{ID: "rp", Hash: tokenHash("rp"), DeviceID: "d-rev", Reprovision: true, MaxUses: 1, ExpiresAt: exp}}, "admin", t0)
		}, store.ErrDeviceRevoked},
		{"create re-provisioning token for a service", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{{ID: "rp", Hash: tokenHash("rp"), DeviceID: "svc", Reprovision: true, MaxUses: 1, ExpiresAt: exp}}, "admin", t0)
		}, store.ErrDeviceExists},
		{"create re-provisioning token for an unknown id", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{{ID: "rp", Hash: tokenHash("rp"), DeviceID: "nobody", Reprovision: true, MaxUses: 1, ExpiresAt: exp}}, "admin", t0)
		}, store.ErrNotFound},
		{"create re-provisioning token without an id", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{{ID: "rp", Hash: tokenHash("rp"), Reprovision: true, MaxUses: 1, ExpiresAt: exp}}, "admin", t0)
		}, store.ErrInvalid},
		{"create tokens, hash twice in batch", func(db *store.DB) error {
			return db.CreateTokens(ctx, []store.Token{
				{ID: "new", Hash: tokenHash("new"), MaxUses: 1, ExpiresAt: exp},
				{ID: "new2", Hash: tokenHash("new"), MaxUses: 1, ExpiresAt: exp},
			}, "admin", t0)
		}, store.ErrTokenExists},
		{"create identity with device role", func(db *store.DB) error {
			return db.CreateIdentity(ctx, store.Device{ID: "n1", Role: store.RoleDevice}, cert("n1", "sn1"), "admin", t0)
		}, store.ErrInvalid},
		{"create identity, id exists", func(db *store.DB) error {
			return db.CreateIdentity(ctx, store.Device{ID: "d1", Role: store.RoleService}, cert("d1", "sn1"), "admin", t0)
		}, store.ErrDeviceExists},
		{"create identity, serial exists", func(db *store.DB) error {
			return db.CreateIdentity(ctx, store.Device{ID: "n1", Role: store.RoleOperator}, cert("n1", "s1"), "admin", t0)
		}, store.ErrCertExists},
	}
	db := fixture(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := store.Snapshot(t, db)
			err := tc.do(db)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			after := store.Snapshot(t, db)
			if !maps.Equal(before, after) {
				t.Fatalf("a refused request changed the store:\n%s", diff(before, after))
			}
		})
	}
	// The snapshot must see a change, or the cases above prove nothing.
	before := store.Snapshot(t, db)
	if err := db.Enroll(ctx, enrollment(tokenHash("bound"), "pinned", "s-pinned")); err != nil {
		t.Fatal(err)
	}
	if maps.Equal(before, store.Snapshot(t, db)) {
		t.Fatal("snapshot did not change after a successful enrollment")
	}
}

func diff(a, b map[string]string) string {
	var buf bytes.Buffer
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			fmt.Fprintf(&buf, "- %s = %q\n", k, v)
		}
	}
	for k, v := range b {
		if w, ok := a[k]; !ok || w != v {
			fmt.Fprintf(&buf, "+ %s = %q\n", k, v)
		}
	}
	return buf.String()
}

func TestReprovision(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	exp := t0.Add(time.Hour)
	mustCreateTokens(t, db, store.Token{ID: "first", Hash: tokenHash("first"), MaxUses: 1, ExpiresAt: exp, DeviceID: "pi"})
	if err := db.Enroll(ctx, enrollment(tokenHash("first"), "pi", "s-old")); err != nil {
		t.Fatal(err)
	}
	mustCreateTokens(t, db, store.Token{ID: "again", Hash: tokenHash("again"), MaxUses: 1, ExpiresAt: exp, DeviceID: "pi", Reprovision: true})

	e := enrollment(tokenHash("again"), "pi", "s-new")
	e.Device.Labels = map[string]string{"site": "b", "rack": "2"}
	e.Now = t0.Add(30 * time.Minute)
	if err := db.Enroll(ctx, e); err != nil {
		t.Fatalf("re-provision: %v", err)
	}
	d, err := db.Device(ctx, "pi")
	if err != nil {
		t.Fatal(err)
	}
	if d.Serial != "s-new" || !d.CreatedAt.Equal(t0) || d.TokenID != "again" || d.Revoked() || d.Role != store.RoleDevice {
		t.Fatalf("device after re-provisioning: %+v", d)
	}
	if want := map[string]string{"site": "b", "rack": "2"}; !maps.Equal(d.Labels, want) {
		t.Fatalf("labels %v, want %v (the token's win)", d.Labels, want)
	}
	// The old key is gone, maybe into other hands: its certificate is
	// revoked (refused by the broker and for renewal, on the CRL); the new
	// one is not.
	if c, err := db.Cert(ctx, "s-old"); err != nil || !c.Revoked() || c.DeviceID != "pi" {
		t.Fatalf("old certificate: %+v, %v", c, err)
	}
	if c, err := db.Cert(ctx, "s-new"); err != nil || c.Revoked() {
		t.Fatalf("new certificate: %+v, %v", c, err)
	}
	if crl, err := db.RevokedCerts(ctx); err != nil || len(crl) != 1 || crl[0].Serial != "s-old" {
		t.Fatalf("revoked certificates %+v, %v; want s-old", crl, err)
	}
	if err := db.Renew(ctx, store.Renewal{DeviceID: "pi", OldSerial: "s-old", Cert: cert("pi", "s-fork"), Now: e.Now}); !errors.Is(err, store.ErrCertRevoked) {
		t.Fatalf("renewal with the superseded certificate: %v, want ErrCertRevoked", err)
	}
	certs, err := db.DeviceCerts(ctx, "pi")
	if err != nil || len(certs) != 2 || certs[0].Serial != "s-new" || certs[1].Serial != "s-old" || !certs[1].Revoked() {
		t.Fatalf("DeviceCerts: %+v, %v; want s-new, then s-old revoked", certs, err)
	}
	if _, err := db.DeviceCerts(ctx, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("DeviceCerts of an unknown id: %v", err)
	}
	evs, err := db.Audit(ctx, store.AuditFilter{DeviceID: "pi"})
	if err != nil {
		t.Fatal(err)
	}
	var seen bool
	for _, ev := range evs {
		if ev.Action == store.ActReprovision && ev.Serial == "s-new" && ev.TokenID == "again" && ev.Detail == "previous certificate s-old; 1 certificate(s) revoked: s-old" {
			seen = true
		}
	}
	if !seen {
		t.Fatalf("no %s audit event in %+v", store.ActReprovision, evs)
	}
	// The token is spent like any other.
	if err := db.Enroll(ctx, enrollment(tokenHash("again"), "pi", "s-third")); !errors.Is(err, store.ErrTokenUsed) {
		t.Fatalf("second use of a one-use re-provisioning token: %v", err)
	}
}

// TestIdentityIssueAudit: services and operators are audited each under
// their own action.
func TestIdentityIssueAudit(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	cert := func(id, serial string) store.Cert {
		return store.Cert{Serial: serial, DeviceID: id, NotBefore: t0, NotAfter: t0.Add(time.Hour), DER: []byte(serial)}
	}
	if err := db.CreateIdentity(ctx, store.Device{ID: "svc", Role: store.RoleService}, cert("svc", "s1"), "admin", t0); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateIdentity(ctx, store.Device{ID: "ops", Role: store.RoleOperator}, cert("ops", "s2"), "admin", t0); err != nil {
		t.Fatal(err)
	}
	evs, err := db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, ev := range evs {
		got = append(got, ev.DeviceID+":"+ev.Action)
	}
	if want := []string{"svc:service.issue", "ops:operator.issue"}; !slices.Equal(got, want) {
		t.Fatalf("audit %v, want %v", got, want)
	}
}
