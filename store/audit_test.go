package store_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/fleetmq/fleetmq/store"
)

func TestAuditFilterLimitSeq(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	for i := range 10 {
		dev := "x"
		if i%2 == 1 {
			dev = "y"
		}
		ev := store.AuditEvent{Seq: 999, Time: at(i), Action: store.ActCertRenew, DeviceID: dev, Detail: "n"}
		if err := db.AppendAudit(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	all, err := db.Audit(ctx, store.AuditFilter{})
	if err != nil || len(all) != 10 {
		t.Fatalf("all: %d %v", len(all), err)
	}
	for i, ev := range all {
		if ev.Seq != uint64(i+1) || !ev.Time.Equal(at(i)) {
			t.Fatalf("event %d: seq %d time %v", i, ev.Seq, ev.Time)
		}
	}

	got, err := db.Audit(ctx, store.AuditFilter{DeviceID: "y", Limit: 3})
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint64{6, 8, 10}; !equalSeqs(got, want) {
		t.Fatalf("y limit 3: %v, want %v", seqs(got), want)
	}
	got, err = db.Audit(ctx, store.AuditFilter{Since: at(6)})
	if err != nil || !equalSeqs(got, []uint64{7, 8, 9, 10}) {
		t.Fatalf("since 6: %v %v", seqs(got), err)
	}
	got, err = db.Audit(ctx, store.AuditFilter{DeviceID: "x", Since: at(3), Limit: 2})
	if err != nil || !equalSeqs(got, []uint64{7, 9}) {
		t.Fatalf("x since 3 limit 2: %v %v", seqs(got), err)
	}
	got, err = db.Audit(ctx, store.AuditFilter{DeviceID: "nobody"})
	if err != nil || len(got) != 0 {
		t.Fatalf("nobody: %v %v", seqs(got), err)
	}
}

func seqs(evs []store.AuditEvent) []uint64 {
	var out []uint64
	for _, ev := range evs {
		out = append(out, ev.Seq)
	}
	return out
}

func equalSeqs(evs []store.AuditEvent, want []uint64) bool {
	got := seqs(evs)
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}

func TestAuditKeepTrims(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{AuditKeep: 5})
	add := func(n int) {
		t.Helper()
		evs := make([]store.AuditEvent, n)
		for i := range evs {
			evs[i] = store.AuditEvent{Time: t0, Action: store.ActTokenFail}
		}
		if err := db.AppendAudit(ctx, evs...); err != nil {
			t.Fatal(err)
		}
	}
	add(3)
	add(1)
	if got, _ := db.Audit(ctx, store.AuditFilter{}); !equalSeqs(got, []uint64{1, 2, 3, 4}) {
		t.Fatalf("before the cap: %v", seqs(got))
	}
	add(4)
	add(1)
	if got, _ := db.Audit(ctx, store.AuditFilter{}); !equalSeqs(got, []uint64{5, 6, 7, 8, 9}) {
		t.Fatalf("after trimming: %v", seqs(got))
	}
	// Sequence numbers keep growing across reopen, and a larger cap stops trimming.
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = store.OpenTestPath(t, path, store.Options{AuditKeep: 7})
	add(1)
	if got, _ := db.Audit(ctx, store.AuditFilter{}); !equalSeqs(got, []uint64{5, 6, 7, 8, 9, 10}) {
		t.Fatalf("after reopen: %v", seqs(got))
	}
}
