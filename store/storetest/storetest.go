// Package storetest holds test helpers over the store's public API, shared
// by the packages whose tests check that a refused request changed nothing.
package storetest

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// Fleet is the part of the store FleetState reads.
type Fleet interface {
	Devices(ctx context.Context) ([]store.Device, error)
	Tokens(ctx context.Context) ([]store.Token, error)
	RevokedCerts(ctx context.Context) ([]store.Cert, error)
}

// FleetState renders the fleet state a refused request must leave
// unchanged — devices, tokens (with their use counts) and revoked
// certificates — as a string to compare before and after. Audit records
// are left out on purpose: failed attempts are recorded there.
func FleetState(tb testing.TB, st Fleet) string {
	tb.Helper()
	ctx := context.Background()
	var snap struct {
		Devices []store.Device
		Tokens  []store.Token
		Revoked []store.Cert
	}
	var err error
	if snap.Devices, err = st.Devices(ctx); err != nil {
		tb.Fatal(err)
	}
	if snap.Tokens, err = st.Tokens(ctx); err != nil {
		tb.Fatal(err)
	}
	if snap.Revoked, err = st.RevokedCerts(ctx); err != nil {
		tb.Fatal(err)
	}
	b, err := json.Marshal(snap)
	if err != nil {
		tb.Fatal(err)
	}
	return string(b)
}

// Auditor is the part of the store Audited reads.
type Auditor interface {
	Audit(ctx context.Context, f store.AuditFilter) ([]store.AuditEvent, error)
}

// Audited returns the device ids of the audit events with action since
// since, sorted, once per event: a test of a change to many devices
// checks that each got its own record.
func Audited(tb testing.TB, st Auditor, action string, since time.Time) []string {
	tb.Helper()
	evs, err := st.Audit(context.Background(), store.AuditFilter{Since: since})
	if err != nil {
		tb.Fatalf("audit: %v", err)
	}
	var ids []string
	for _, ev := range evs {
		if ev.Action == action {
			ids = append(ids, ev.DeviceID)
		}
	}
	slices.Sort(ids)
	return ids
}
