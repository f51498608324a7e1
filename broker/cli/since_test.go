package cli

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/store"
)

// A time copied from a table is a --since: `fleetmq audit` printed
// 2026-12-07 20:26:32 UTC and refused it back.
func TestSinceTakesTheTablesTime(t *testing.T) {
	data := startNode(t)
	mustRun(t, data, "token", "create")
	row := strings.Split(mustRun(t, data, "audit"), "\n")[1]
	printed := row[:len(admin.TimeLayout)]
	at, err := time.Parse(admin.TimeLayout, printed)
	if err != nil {
		t.Fatalf("audit table row %q: %v", row, err)
	}
	count := func(since string) int {
		t.Helper()
		var evs []store.AuditEvent
		if err := json.Unmarshal([]byte(mustRun(t, data, "audit", "--json", "--since", since)), &evs); err != nil {
			t.Fatal(err)
		}
		return len(evs)
	}
	later := at.Add(time.Hour)
	if n := count(printed); n != 1 {
		t.Errorf("--since %q: %d events, want the token's creation", printed, n)
	}
	for _, since := range []string{later.Format(admin.TimeLayout), later.Format(time.RFC3339)} {
		if n := count(since); n != 0 {
			t.Errorf("--since %q: %d events, want none", since, n)
		}
	}
	if n := count("1h"); n != 1 {
		t.Errorf("--since 1h: %d events", n)
	}
}
