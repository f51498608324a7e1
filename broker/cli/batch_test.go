package cli

import (
	"encoding/csv"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// A number has one id whatever batch mints it: at least four digits,
// never padded to the width of the batch's last number. Otherwise the
// README's next batch, --start 5001 after pi-0001 … pi-5000, made pi-05001
// in one batch and pi-5001 in another: two devices for one number, which
// the id-taken check could not see.
func TestBatchIDsDoNotDependOnTheBatch(t *testing.T) {
	data := startNode(t)
	ids := func(args ...string) []string {
		t.Helper()
		var toks []admin.NewToken
		out := mustRun(t, data, append([]string{"token", "create", "--json"}, args...)...)
		if err := json.Unmarshal([]byte(out), &toks); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		var ids []string
		for _, tk := range toks {
			ids = append(ids, tk.DeviceID)
		}
		return ids
	}
	// One request (the server numbers it) and several (the CLI does).
	if got := ids("--count", "3", "--prefix", "px-", "--start", "9999"); strings.Join(got, " ") != "px-9999 px-10000 px-10001" {
		t.Errorf("batch across 10000: %v", got)
	}
	got := ids("--count", "1001", "--prefix", "px-", "--start", "8000")
	if len(got) != 1001 || got[0] != "px-8000" || got[1000] != "px-9000" {
		t.Errorf("chunked batch: %d ids, %v … %v", len(got), got[0], got[len(got)-1])
	}
	csvPath := filepath.Join(t.TempDir(), "px.csv")
	mustRun(t, data, "token", "create", "--count", "5", "--prefix", "py-", "--start", "5001", "--csv", csvPath)
	f, err := os.Open(csvPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil || len(rows) != 6 || rows[1][0] != "py-5001" || rows[5][0] != "py-5005" {
		t.Fatalf("README's --start 5001: %v %v", err, rows)
	}
}
