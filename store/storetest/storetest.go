// Package storetest holds test helpers over the store's public API, shared
// by the packages whose tests check that a refused request changed nothing.
package storetest

import (
	"context"
	"encoding/json"
	"testing"

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
