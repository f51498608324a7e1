package agent

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"testing"
	"time"
)

func TestRenewalTime(t *testing.T) {
	nb := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(90 * 24 * time.Hour)
	life := na.Sub(nb)
	mid := nb.Add(60 * 24 * time.Hour) // 2/3 of 90 days
	cases := []struct {
		r    float64
		want time.Time
	}{
		{0.5, mid},
		{0, mid.Add(-life / 20)},
		{1, mid.Add(life / 20)},
		{0.75, mid.Add(life / 40)},
	}
	for _, c := range cases {
		got := renewalTime(nb, na, c.r)
		if d := got.Sub(c.want); d < -time.Millisecond || d > time.Millisecond {
			t.Errorf("renewalTime(r=%v) = %v, want %v", c.r, got, c.want)
		}
	}
	// Over the whole range of r the time stays in the ±5 % window.
	for i := 0; i < 1000; i++ {
		r := float64(i) / 1000
		got := renewalTime(nb, na, r)
		if got.Before(mid.Add(-life/20)) || got.After(mid.Add(life/20)) {
			t.Fatalf("renewalTime(r=%v) = %v outside the jitter window", r, got)
		}
	}
}

func TestPlanRenewal(t *testing.T) {
	nb := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(24 * time.Hour)
	grace := 7 * 24 * time.Hour
	at := renewalTime(nb, na, 0.5) // 16h after nb
	cases := []struct {
		name     string
		now      time.Time
		wantMode renewMode
		wantAt   time.Time
	}{
		{"clock before NotBefore", nb.Add(-time.Hour), modeClockBehind, nb},
		{"fresh", nb.Add(time.Hour), modeWait, at},
		{"just before 2/3", at.Add(-time.Second), modeWait, at},
		{"at 2/3", at, modeMTLS, at},
		{"late but valid", na.Add(-time.Minute), modeMTLS, na.Add(-time.Minute)},
		{"at expiry", na, modeExpired, na},
		{"expired within grace", na.Add(grace - time.Second), modeExpired, na.Add(grace - time.Second)},
		{"at end of grace", na.Add(grace), modeNeedsToken, na.Add(grace)},
		{"long expired", na.Add(30 * 24 * time.Hour), modeNeedsToken, na.Add(30 * 24 * time.Hour)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mode, when := planRenewal(c.now, nb, na, time.Time{}, grace, 0.5)
			if mode != c.wantMode || !when.Equal(c.wantAt) {
				t.Errorf("planRenewal = %v at %v, want %v at %v", mode, when, c.wantMode, c.wantAt)
			}
		})
	}
}

func TestPlanRenewalCountsFromReceipt(t *testing.T) {
	// Backdated by 10 minutes, valid for 3 more: the 2/3 point of the
	// nominal lifetime (nb+8m40s) is already past on arrival.
	received := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	nb, na := received.Add(-10*time.Minute), received.Add(3*time.Minute)
	if mode, _ := planRenewal(received, nb, na, time.Time{}, time.Hour, 0.5); mode != modeMTLS {
		t.Fatalf("without receipt time: mode %v, want immediate renewal (the case being fixed)", mode)
	}
	mode, at := planRenewal(received, nb, na, received, time.Hour, 0.5)
	if want := received.Add(2 * time.Minute); mode != modeWait || !at.Equal(want) {
		t.Errorf("with receipt time: %v at %v, want wait until %v", mode, at, want)
	}
	// A receipt time outside the validity (a wrong clock then) is ignored.
	if mode, _ := planRenewal(received, nb, na, na.Add(time.Hour), time.Hour, 0.5); mode != modeMTLS {
		t.Errorf("receipt after expiry used: mode %v", mode)
	}
}

func TestBackoffBounds(t *testing.T) {
	min, max := 10*time.Second, time.Hour
	for attempt := 0; attempt < 100; attempt++ {
		full := max
		if attempt < 20 && min<<attempt < max {
			full = min << attempt
		}
		for _, r := range []float64{0, 0.25, 0.5, 0.999999} {
			d := backoff(attempt, min, max, r)
			if d < full/2 || d > full {
				t.Fatalf("backoff(%d, r=%v) = %v, want in [%v, %v]", attempt, r, d, full/2, full)
			}
			if d > max {
				t.Fatalf("backoff(%d) = %v exceeds cap %v", attempt, d, max)
			}
		}
	}
	if a, b := backoff(3, min, max, 0), backoff(4, min, max, 0); b <= a {
		t.Errorf("backoff does not grow: %v then %v", a, b)
	}
	if d := backoff(0, min, max, 0); d < min/2 {
		t.Errorf("first backoff %v below min/2", d)
	}
}

func TestProofSignature(t *testing.T) {
	csrDER := []byte("not really a csr, but bytes to sign")
	ek, err := newKey()
	if err != nil {
		t.Fatal(err)
	}
	sig, err := proofSignature(ek, csrDER)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := base64.StdEncoding.DecodeString(sig)
	if err != nil {
		t.Fatalf("signature is not std base64: %v", err)
	}
	sum := sha256.Sum256(csrDER)
	if !ecdsa.VerifyASN1(&ek.PublicKey, sum[:], raw) {
		t.Error("ECDSA proof does not verify over SHA-256 of the CSR")
	}

	_, edk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sig, err = proofSignature(edk, csrDER)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ = base64.StdEncoding.DecodeString(sig)
	if !ed25519.Verify(edk.Public().(ed25519.PublicKey), csrDER, raw) {
		t.Error("Ed25519 proof does not verify over the CSR DER")
	}
}

// TestBackoffAsDocumented pins the waits device-agent/README.md states
// ("Renewal"): retry n waits between d/2 and d, d = min·2ⁿ capped at max.
func TestBackoffAsDocumented(t *testing.T) {
	c := Config{}.withDefaults()
	cases := []struct {
		what     string
		attempt  int
		min, max time.Duration
		lo, hi   time.Duration
	}{
		{"first retry", 0, c.RetryMin, c.RetryMax, 5 * time.Second, 10 * time.Second},
		{"second retry", 1, c.RetryMin, c.RetryMax, 10 * time.Second, 20 * time.Second},
		{"retries at the cap", 20, c.RetryMin, c.RetryMax, 30 * time.Minute, time.Hour},
		{"first wait when turned away", 0, c.BlockedRetryMin, c.BlockedRetryMax, 30 * time.Minute, time.Hour},
		{"second wait when turned away", 1, c.BlockedRetryMin, c.BlockedRetryMax, time.Hour, 2 * time.Hour},
		{"turned away, at the cap", 20, c.BlockedRetryMin, c.BlockedRetryMax, 12 * time.Hour, 24 * time.Hour},
	}
	for _, k := range cases {
		lo, hi := backoff(k.attempt, k.min, k.max, 0), backoff(k.attempt, k.min, k.max, 0.999999999)
		if lo != k.lo || hi < k.hi-time.Second || hi > k.hi {
			t.Errorf("%s: %v … %v, documented %v … %v", k.what, lo, hi, k.lo, k.hi)
		}
	}
}

// TestReconnectBackoffAfterSessions: the waits before reconnecting, with
// the defaults, on a link that drops every minute (each wait back at the
// first retry's: the broker works) and against a broker that drops the
// device at once (the waits grow to the cap).
func TestReconnectBackoffAfterSessions(t *testing.T) {
	c := Config{}.withDefaults()
	waits := func(connected bool, lasted time.Duration) (last time.Duration) {
		attempt := 0
		for range 10 {
			attempt = nextConnectAttempt(attempt, connected, lasted, c.ConnectStable)
			last = backoff(attempt, c.ConnectRetryMin, c.ConnectRetryMax, 0.999999999)
			attempt++
		}
		return last
	}
	if w := waits(true, time.Minute); w > c.ConnectRetryMin {
		t.Errorf("after ten one-minute sessions the agent waits %v to reconnect, want at most %v", w, c.ConnectRetryMin)
	}
	for _, tc := range []struct {
		connected bool
		lasted    time.Duration
	}{{true, time.Second}, {false, time.Minute}} {
		if w := waits(tc.connected, tc.lasted); w < c.ConnectRetryMax-time.Second {
			t.Errorf("connected %v for %v, ten times: the agent waits %v, want the cap %v", tc.connected, tc.lasted, w, c.ConnectRetryMax)
		}
	}
}
