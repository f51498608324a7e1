package enroll

import (
	"context"
	"crypto"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// TestEnrollRepeatAfterLostAnswer: an enrollment whose answer was lost
// (the link dropped it after the server committed) is repeated with the
// used-up token and the same key, and gets the same certificate; nothing
// else gets anything from a used token.
func TestEnrollRepeatAfterLostAnswer(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	ctx := context.Background()
	try := func(via, secret string, key crypto.Signer, cn string) (serial string, rep estReply) {
		t.Helper()
		if via == "EST" {
			rep = e.do(t, e.client(t, nil), http.MethodPost, "/.well-known/est/simpleenroll",
				map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth("", secret)}, estBase64Body(estCSR(t, key, cn)))
			if rep.status == http.StatusOK {
				return SerialHex(wantESTCert(t, rep, key.Public()).SerialNumber), rep
			}
			return "", rep
		}
		rep = e.do(t, e.client(t, nil), http.MethodPost, "/v1/enroll",
			map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + secret}, estCSR(t, key, cn))
		c := v1Answer(t, rep)
		if c == nil {
			return "", rep
		}
		return SerialHex(c.SerialNumber), rep
	}
	refused := func(what string, rep estReply) {
		t.Helper()
		code, msg := apiError(t, rep)
		if code != CodeTokenUsed || !strings.Contains(msg, "enrolling again with the same key") {
			t.Errorf("%s: %d %s (%s), want token_used", what, rep.status, code, msg)
		}
	}
	for _, via := range []string{"v1", "EST"} {
		bound, free := e.mintToken(t, "pi-"+strings.ToLower(via), 1), e.mintToken(t, "", 1)
		key, freeKey := genP256(t), genP256(t)
		first, _ := try(via, bound, key, "")
		freeFirst, _ := try(via, free, freeKey, "pi-free-"+strings.ToLower(via))
		if first == "" || freeFirst == "" {
			t.Fatalf("%s: first enrollments failed", via)
		}
		before := e.snapshot(t)
		if again, rep := try(via, bound, key, ""); again != first || rep.status != http.StatusOK {
			t.Errorf("%s: repeat with the same key: serial %q (%d %s), want %s with 200", via, again, rep.status, rep.body, first)
		}
		if again, _ := try(via, free, freeKey, "pi-free-"+strings.ToLower(via)); again != freeFirst {
			t.Errorf("%s: repeat of a free token: serial %q, want %s", via, again, freeFirst)
		}
		if after := e.snapshot(t); after != before {
			t.Errorf("%s: a repeat changed the fleet state", via)
		}
		_, rep := try(via, bound, genP256(t), "")
		refused(via+": another key", rep)
		_, rep = try(via, bound, key, "pi-elsewhere")
		refused(via+": a CSR asking for another id than the bound one", rep)
		_, rep = try(via, free, freeKey, "pi-other")
		refused(via+": the same key for another id", rep)
	}
	evs, err := e.db.Audit(ctx, store.AuditFilter{DeviceID: "pi-v1"})
	if err != nil {
		t.Fatal(err)
	}
	repeats := 0
	for _, ev := range evs {
		if ev.Action == store.ActEnrollRepeat {
			repeats++
		}
	}
	if repeats != 1 {
		t.Errorf("%d enroll.repeat records for pi-v1, want 1", repeats)
	}

	// A token with uses left repeats too: the retry would otherwise find
	// its id taken by its own first use.
	multi, mkey := e.mintToken(t, "", 3), genP256(t)
	mfirst, _ := try("v1", multi, mkey, "pi-multi")
	if again, rep := try("v1", multi, mkey, "pi-multi"); again != mfirst || mfirst == "" {
		t.Errorf("repeat with a multi-use token: serial %q (%d %s), want %s", again, rep.status, rep.body, mfirst)
	}
	if tok, err := e.db.TokenByHash(ctx, mustParseToken(t, multi)); err != nil || tok.Uses != 1 {
		t.Errorf("multi-use token after a repeat: %d uses, %v; want 1", tok.Uses, err)
	}

	// Only the certificate this token's use issued: not one of a device
	// another token enrolled, even with that device's key, nor one its
	// device renewed to since.
	spentA, lateTok, lateKey := e.mintToken(t, "", 1), e.mintToken(t, "pi-other-token", 1), genP256(t)
	if s, _ := try("v1", spentA, genP256(t), "pi-first-a"); s == "" {
		t.Fatal("enroll pi-first-a")
	}
	if s, _ := try("v1", lateTok, lateKey, ""); s == "" {
		t.Fatal("enroll pi-other-token")
	}
	_, rep := try("v1", spentA, lateKey, "pi-other-token")
	refused("another token's device, with its key", rep)

	// The token has expired since: the certificate it gave is still the
	// device's to fetch again.
	secret, key := e.mintToken(t, "pi-late", 1), genP256(t)
	first, _ := try("v1", secret, key, "")
	e.clock.Set(2 * 24 * time.Hour)
	if again, rep := try("v1", secret, key, ""); again != first {
		t.Errorf("repeat after the token expired: serial %q (%d %s), want %s", again, rep.status, rep.body, first)
	}
	if code, _ := apiError(t, func() estReply { _, rep := try("v1", secret, genP256(t), ""); return rep }()); code != CodeTokenExpired {
		t.Errorf("another key with the expired token: %s, want token_expired", code)
	}
	e.clock.Set(0)

	// Revoked, renewed to another key, or expired: nothing to repeat.
	for name, spoil := range map[string]func(id string, key crypto.Signer){
		"revoked": func(id string, _ crypto.Signer) {
			if _, err := e.db.RevokeDevice(ctx, id, "test", time.Now()); err != nil {
				t.Fatal(err)
			}
		},
		"expired": func(string, crypto.Signer) { e.clock.Set(31 * 24 * time.Hour) },
	} {
		id := "pi-" + name
		secret, key := e.mintToken(t, id, 1), genP256(t)
		e.clock.Set(0)
		if s, _ := try("v1", secret, key, ""); s == "" {
			t.Fatalf("%s: first enrollment failed", name)
		}
		spoil(id, key)
		_, rep := try("v1", secret, key, "")
		if rep.status/100 == 2 {
			t.Errorf("%s: a repeat got a certificate", name)
		}
		e.clock.Set(0)
	}
	secret, key = e.mintToken(t, "pi-renewed", 1), genP256(t)
	leaf := e.enroll(t, secret, key, "pi-renewed")
	newKey := genP256(t)
	rep = e.do(t, e.client(t, tlsCert(leaf, key)), http.MethodPost, "/.well-known/est/simplereenroll",
		map[string]string{"Content-Type": "application/pkcs10"}, estBase64Body(estCSR(t, newKey, "pi-renewed")))
	wantESTCert(t, rep, newKey.Public())
	_, rep = try("v1", secret, key, "")
	refused("renewed since, the old key", rep)
	_, rep = try("v1", secret, newKey, "")
	refused("renewed since, the new key", rep)
}

func mustParseToken(tb testing.TB, secret string) [32]byte {
	tb.Helper()
	tok, err := ParseToken(secret)
	if err != nil {
		tb.Fatal(err)
	}
	return tok.Hash
}
