package server_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// TestRetentionLoop: the running server deletes telemetry past its
// retention and, daily, the record of a certificate long past use and of a
// token long expired, while the device's current certificate, recent
// telemetry and a live token stay.
func TestRetentionLoop(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, func(c *server.Config) {
		c.Retention = time.Hour
		c.RenewGrace = time.Hour
		c.RetentionInterval = 10 * time.Millisecond
	})
	db := s.Store()
	dev := s.identity(t, "dev-1", store.RoleDevice)
	oldSerial := enroll.SerialHex(dev.cert.SerialNumber)

	renewed, err := s.CA().IssueDevice(&newKey(t).PublicKey, "dev-1", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	now := s.clock.Now()
	current := store.Cert{Serial: enroll.SerialHex(renewed.SerialNumber), DeviceID: "dev-1", NotBefore: renewed.NotBefore, NotAfter: renewed.NotAfter, IssuedAt: now, DER: renewed.Raw}
	if err := db.Renew(ctx, store.Renewal{DeviceID: "dev-1", OldSerial: oldSerial, Cert: current, Remote: "test", Now: now}); err != nil {
		t.Fatal(err)
	}
	msg := func(at time.Time) store.Message {
		return store.Message{DeviceID: "dev-1", Topic: "devices/dev-1/telemetry", Received: at, Payload: []byte(`{}`)}
	}
	if err := db.AppendTelemetry(ctx, []store.Message{msg(now)}); err != nil {
		t.Fatal(err)
	}
	s.token(t, "--ttl", "1h") // expired long before the cut

	// Past the old certificate's expiry, the renewal grace and the 90 days
	// its record is kept for an investigation.
	s.clock.Advance(24*time.Hour + time.Hour + 91*24*time.Hour)
	later := s.clock.Now()
	if err := db.AppendTelemetry(ctx, []store.Message{msg(later)}); err != nil {
		t.Fatal(err)
	}
	s.token(t, "--ttl", "1h") // live
	eventually(t, func() bool {
		got, err := db.Telemetry(ctx, "dev-1", time.Time{}, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = db.Cert(ctx, oldSerial)
		toks, terr := db.Tokens(ctx)
		if terr != nil {
			t.Fatal(terr)
		}
		return len(got) == 1 && errors.Is(err, store.ErrCertUnknown) && len(toks) == 1 // the live one
	}, "old telemetry, the old certificate record and the expired token deleted")
	if got, err := db.Telemetry(ctx, "dev-1", time.Time{}, 0); err != nil || !got[0].Received.Equal(later) {
		t.Fatalf("kept telemetry: %+v, %v", got, err)
	}
	if toks, err := db.Tokens(ctx); err != nil || len(toks) != 1 || !toks[0].ExpiresAt.After(later) {
		t.Fatalf("tokens kept: %+v, %v; want the live one", toks, err)
	}
	if _, err := db.Cert(ctx, current.Serial); err != nil {
		t.Fatalf("current certificate record: %v", err)
	}
}
