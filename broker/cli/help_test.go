package cli

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// -h on a command group lists its subcommands and succeeds; a group
// without a subcommand lists them too, as a usage error.
func TestGroupHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"token", "-h"}, 0, "fleetmq token create"},
		{[]string{"device", "--help"}, 0, "fleetmq device list"},
		{[]string{"help", "token"}, 0, "fleetmq token list"},
		{[]string{"service", "-h"}, 0, "fleetmq service issue NAME [--out DIR]"},
		{[]string{"device"}, 2, "fleetmq device list"},
	} {
		out, errs, code := fleetmq(t, "", tc.args...)
		if code != tc.code || !strings.Contains(out+errs, tc.want) {
			t.Errorf("fleetmq %s: exit %d: %s%s", strings.Join(tc.args, " "), code, out, errs)
		}
		if strings.Contains(out+errs, "fleetmq ca show") && tc.args[0] != "ca" {
			t.Errorf("fleetmq %s lists another group: %s", strings.Join(tc.args, " "), out)
		}
	}
	out, _, code := fleetmq(t, "", "-h")
	if code != 0 || !strings.Contains(out, "[--follow] [--json]") || !strings.Contains(out, "operator issue NAME [--out DIR]") {
		t.Errorf("fleetmq -h: %s", out)
	}
	out, _, code = fleetmq(t, "", "version", "--json")
	var v struct{ Version string }
	if code != 0 || json.Unmarshal([]byte(out), &v) != nil || v.Version != Version {
		t.Errorf("version --json: exit %d: %q", code, out)
	}
}

// Tables print times in UTC, labelled, whatever the local zone, as the
// JSON, the CSV and the dashboard do; --json with --csv describes the
// tokens without their secrets; --expiring 0 means "already expired",
// never "every device, revoked ones too"; token list shows the newest
// 100 unless told otherwise.
func TestOperatorOutputs(t *testing.T) {
	t.Setenv("TZ", "America/New_York")
	data := startNode(t)
	utc := regexp.MustCompile(`\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC`)
	if out := mustRun(t, data, "token", "create", "--count", "2", "--prefix", "tb-"); !utc.MatchString(out) {
		t.Errorf("token table: %s", out)
	}
	out := mustRun(t, data, "token", "create", "--count", "2", "--prefix", "tc-", "--json", "--csv", filepath.Join(t.TempDir(), "tc.csv"))
	var recs []admin.NewToken
	if err := json.Unmarshal([]byte(out), &recs); err != nil || len(recs) != 2 || recs[0].DeviceID != "tc-0001" || strings.Contains(out, "fmq1.") {
		t.Errorf("--csv --json: %v %s", err, out)
	}
	mustRun(t, data, "service", "issue", "backend", "--out", t.TempDir())
	mustRun(t, data, "device", "revoke", "backend")
	if out := mustRun(t, data, "device", "list", "--expiring", "0", "--json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("device list --expiring 0: %s", out)
	}
	if out := mustRun(t, data, "device", "list"); !utc.MatchString(out) {
		t.Errorf("device table: %s", out)
	}
	mustRun(t, data, "token", "create", "--count", "101", "--prefix", "td-")
	out, errs, code := fleetmq(t, data, "token", "list", "--json")
	var toks []admin.TokenInfo
	if code != 0 || json.Unmarshal([]byte(out), &toks) != nil || len(toks) != 100 || !strings.Contains(errs, "the newest 100 of 105 tokens") {
		t.Errorf("token list: exit %d, %d tokens, %s", code, len(toks), errs)
	}
	out = mustRun(t, data, "token", "list", "--all", "--json")
	if json.Unmarshal([]byte(out), &toks) != nil || len(toks) != 105 {
		t.Errorf("token list --all: %d tokens", len(toks))
	}
}
