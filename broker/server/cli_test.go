package server_test

import (
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/admin"
)

func TestOperatorCLI(t *testing.T) {
	s := startServer(t)

	out, errs, code := s.cli(t, "ca", "show")
	fp := s.CA().Fingerprint()
	if code != 0 || !strings.Contains(out, hex.EncodeToString(fp[:])) {
		t.Fatalf("ca show: %d %s %s", code, out, errs)
	}

	tok := s.token(t, "--device", "pi-cli", "--ttl", "2h", "--label", "site=lab", "--label", "rack=3")
	if !strings.HasPrefix(tok, "fmq1.") || strings.Count(tok, ".") != 2 {
		t.Fatalf("token create printed %q", tok)
	}
	out, _, _ = s.cli(t, "token", "list")
	if !strings.Contains(out, "pi-cli") || !strings.Contains(out, "rack=3,site=lab") || strings.Contains(out, tok) {
		t.Fatalf("token list (must never show secrets):\n%s", out)
	}
	s.enroll(t, tok, "pi-cli")

	out, _, code = s.cli(t, "device", "list")
	if code != 0 || !strings.Contains(out, "pi-cli") || !strings.Contains(out, "offline") {
		t.Fatalf("device list:\n%s", out)
	}
	out, _, _ = s.cli(t, "device", "list", "--json")
	var devs []admin.DeviceInfo
	if err := json.Unmarshal([]byte(out), &devs); err != nil || len(devs) != 1 || devs[0].ID != "pi-cli" {
		t.Fatalf("device list --json: %v %s", err, out)
	}
	out, _, _ = s.cli(t, "device", "list", "--expiring", "7d")
	if strings.Contains(out, "pi-cli") {
		t.Errorf("a 30-day certificate listed as expiring within 7 days")
	}
	out, _, _ = s.cli(t, "device", "list", "--expiring", "31d")
	if !strings.Contains(out, "pi-cli") {
		t.Errorf("--expiring 31d misses the device:\n%s", out)
	}
	out, _, code = s.cli(t, "device", "show", "pi-cli")
	if code != 0 || !strings.Contains(out, "site=lab") {
		t.Fatalf("device show:\n%s", out)
	}
	if _, errs, code := s.cli(t, "device", "show", "nope"); code != 1 || !strings.Contains(errs, `no identity "nope" (not_found)`) {
		t.Fatalf("device show unknown: %d %s", code, errs)
	}
	if _, _, code := s.cli(t, "device", "revoke", "pi-cli"); code != 0 {
		t.Fatal("revoke failed")
	}
	out, _, _ = s.cli(t, "device", "list", "--revoked")
	if !strings.Contains(out, "pi-cli") || !strings.Contains(out, "revoked") {
		t.Fatalf("device list --revoked:\n%s", out)
	}
	if _, errs, code := s.cli(t, "device", "revoke", "pi-cli"); code != 1 || !strings.Contains(errs, "device_revoked") {
		t.Fatalf("second revoke: %d %s", code, errs)
	}
	// Enrollment never reuses an id: a token bound to one in use could
	// never be used, so none is minted.
	before, _, _ := s.cli(t, "token", "list", "--json")
	if _, errs, code := s.cli(t, "token", "create", "--device", "pi-cli"); code != 1 ||
		!strings.Contains(errs, "id_taken") || !strings.Contains(errs, "device pi-cli exists and was revoked") {
		t.Fatalf("token for a revoked device's id: %d %s", code, errs)
	}
	if _, errs, code := s.cli(t, "token", "create", "--device", "pi-cli", "--reprovision"); code != 1 || !strings.Contains(errs, "device_revoked") {
		t.Fatalf("re-provisioning token for a revoked device: %d %s", code, errs)
	}
	if _, errs, code := s.cli(t, "token", "create", "--device", "nobody", "--reprovision"); code != 1 || !strings.Contains(errs, "no device nobody to re-provision") {
		t.Fatalf("re-provisioning token for an unknown id: %d %s", code, errs)
	}
	if after, _, _ := s.cli(t, "token", "list", "--json"); after != before {
		t.Fatalf("a refused token create changed the token list:\n%s\n%s", before, after)
	}

	// A free token does not take an id a usable token is bound to. A
	// token of two uses that enrolled its id stays valid but can never be
	// used again: listed as unusable, with why.
	spare := s.token(t, "--device", "pi-spare", "--uses", "2")
	free := s.token(t)
	if a := s.post(t, s.client(nil), "/v1/enroll", bearer(free), csrPEM(t, newKey(t), "pi-spare")); a.status != 409 || a.code != "id_has_token" {
		t.Fatalf("free token enrolling pi-spare, which a token is bound to: %d %s", a.status, a.body)
	}
	s.enroll(t, spare, "pi-spare")
	s.enroll(t, free, "pi-free") // the refusal spent none of its use
	out, _, _ = s.cli(t, "token", "list")
	if !strings.Contains(out, "unusable: pi-spare exists; only a re-provisioning token") {
		t.Fatalf("token list does not show the spare token as unusable:\n%s", out)
	}
	var infos []admin.TokenInfo
	out, _, _ = s.cli(t, "token", "list", "--json")
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, ti := range infos {
		states[ti.DeviceID] += ti.State + " "
	}
	if states["pi-spare"] != "unusable " || states["pi-cli"] != "used " || states[""] != "used " {
		t.Fatalf("token states by bound id %q:\n%s", states, out)
	}
	if strings.Contains(out, strings.Split(spare, ".")[1]) {
		t.Fatal("token list shows a secret")
	}

	// Usage errors exit 2 with a message, and touch nothing.
	for _, args := range [][]string{
		{"token", "create", "--label", "nokey"},
		{"token", "create", "--ttl", "soon"},
		{"token", "create", "--uses", "0"},
		{"token", "create", "--reprovision"},
		{"device", "show"},
		{"frobnicate"},
		{"token"},
	} {
		if _, errs, code := s.cli(t, args...); code != 2 || errs == "" {
			t.Errorf("%v: exit %d, stderr %q", args, code, errs)
		}
	}
	// Server-side validation errors are usage errors too: exit 2, with the code.
	if _, errs, code := s.cli(t, "token", "create", "--device", "Bad/Id"); code != 2 || !strings.Contains(errs, "id_invalid") {
		t.Errorf("token for an invalid id: %d %s", code, errs)
	}
	for _, label := range []string{"k=\x1b[31mred", "k=two\nlines", "k\t=v"} {
		if _, errs, code := s.cli(t, "token", "create", "--label", label); code != 2 || !strings.Contains(errs, "without control characters") {
			t.Errorf("label %q: %d %s", label, code, errs)
		}
	}
	if after, _, _ := s.cli(t, "token", "list", "--json"); !strings.Contains(after, "pi-spare") || strings.Contains(after, "red") {
		t.Fatalf("refused labels stored:\n%s", after)
	}
	// Durations in days everywhere; --limit within bounds.
	for _, args := range [][]string{{"audit", "--since", "7d"}, {"telemetry", "pi-cli", "--since", "1d"}} {
		if _, errs, code := s.cli(t, args...); code != 0 {
			t.Errorf("%v: %d %s", args, code, errs)
		}
	}
	// Nothing to show is said, on stderr: stdout stays empty for scripts.
	if out, errs, code := s.cli(t, "telemetry", "pi-cli", "--since", "1d"); code != 0 || out != "" || errs != "no telemetry from pi-cli since 1d\n" {
		t.Errorf("telemetry of a device without messages: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	for _, args := range [][]string{{"audit", "--since", "-1h"}, {"audit", "--since", "NaNd"}} {
		if _, errs, code := s.cli(t, args...); code != 2 || !strings.Contains(errs, "bad_request") {
			t.Errorf("%v: %d %s", args, code, errs)
		}
	}
}

// TestCLIUsageErrors: mistakes on the command line exit 2 with a message
// and change nothing on the server.
func TestCLIUsageErrors(t *testing.T) {
	s := startServer(t)
	before, _, _ := s.cli(t, "token", "list", "--json")
	for _, args := range [][]string{
		{"token", "create", "--label", "a=1", "--label", "a=2"},
		{"token", "create", "--label", "k=\xff"},
		{"token", "create", "--ttl", "NaNd"},
		{"token", "create", "--ttl", "99999999d"},
		{"token", "create", "--count", "0", "--prefix", "z-"},
		{"device", "list", "--expiring", "99999999d"},
		{"audit", "--limit", "0"},
		{"audit", "--limit", "-1"},
		{"telemetry", "pi-1", "--limit", "0"},
	} {
		if _, errs, code := s.cli(t, args...); code != 2 || errs == "" {
			t.Errorf("%v: exit %d, stderr %q", args, code, errs)
		}
	}
	if after, _, _ := s.cli(t, "token", "list", "--json"); after != before {
		t.Fatalf("usage errors changed the token list:\n%s\n%s", before, after)
	}
	// Help asked for is not an error.
	for _, args := range [][]string{{"--help"}, {"serve", "--help"}, {"token", "create", "-h"}, {"telemetry", "--help"}} {
		if out, errs, code := s.cli(t, args...); code != 0 || !strings.Contains(strings.ToLower(out+errs), "usage") {
			t.Errorf("%v: exit %d, output %q %q", args, code, out, errs)
		}
	}
	// The shared flag before the command, as people type it.
	if out, errs, code := s.cli(t, "--data", s.cfg.DataDir, "token", "list"); code != 0 || !strings.Contains(out, "DEVICE") {
		t.Errorf("--data before the command: %d %s %s", code, out, errs)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	for data, want := range map[string]string{filepath.Join(dir, "nope"): "no data folder", file: "is not a folder"} {
		if _, errs, code := s.cli(t, "device", "list", "--data", data); code != 1 || !strings.Contains(errs, want) {
			t.Errorf("--data %s: %d %s", data, code, errs)
		}
	}
}

// TestIdentityIssueChecksOutputFirst: an --out the key cannot be written to
// is refused before the server issues anything — ids are for life, so a
// certificate issued for a lost key would burn the name.
func TestIdentityIssueChecksOutputFirst(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	os.WriteFile(blocker, nil, 0o600)
	if _, errs, code := s.cli(t, "service", "issue", "svc-a", "--out", filepath.Join(blocker, "sub")); code != 1 || errs == "" {
		t.Fatalf("issue into a path under a file: %d %s", code, errs)
	}
	if out, _, _ := s.cli(t, "device", "list", "--json"); strings.Contains(out, "svc-a") {
		t.Fatalf("identity issued although its key could not be written:\n%s", out)
	}
	// A new folder is made (0700), as the README's example expects.
	out := filepath.Join(dir, "new", "svc-a")
	if _, errs, code := s.cli(t, "service", "issue", "svc-a", "--out", out); code != 0 {
		t.Fatalf("issue into a new folder: %s", errs)
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("--out folder: %v %v", fi, err)
	}
	for name, mode := range map[string]os.FileMode{"svc-a.key": 0o600, "svc-a.pem": 0o644, "ca.pem": 0o644} {
		if fi, err := os.Stat(filepath.Join(out, name)); err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v %v", name, fi, err)
		}
	}
	// An existing key or certificate is never overwritten.
	if _, errs, code := s.cli(t, "operator", "issue", "svc-a", "--out", out); code != 1 || !strings.Contains(errs, "exists") {
		t.Fatalf("issue over existing files: %d %s", code, errs)
	}
	// A name is for life, whatever the role.
	if _, errs, code := s.cli(t, "operator", "issue", "svc-a", "--out", t.TempDir()); code != 1 || !strings.Contains(errs, "the name svc-a is taken") {
		t.Fatalf("issue under a taken name: %d %s", code, errs)
	}
}

func TestBulkTokensCSV(t *testing.T) {
	s := startServer(t)
	path := filepath.Join(t.TempDir(), "tokens.csv")
	if _, errs, code := s.cli(t, "token", "create", "--count", "25", "--prefix", "pi-", "--csv", path); code != 0 {
		t.Fatalf("bulk create: %s", errs)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("csv mode: %v %v", fi, err)
	}
	f, _ := os.Open(path)
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil || len(rows) != 26 || rows[0][0] != "id" || rows[1][0] != "pi-0001" || rows[25][0] != "pi-0025" {
		t.Fatalf("csv: %v %v", err, rows)
	}
	d := s.enroll(t, rows[7][1], "")
	if d.resp.DeviceID != "pi-0007" {
		t.Fatalf("bound bulk token enrolled %q", d.resp.DeviceID)
	}
	// A batch reaching an id taken says where the next batch can start:
	// after the first batch's live tokens too, not only the enrolled pi-0007.
	if _, errs, code := s.cli(t, "token", "create", "--count", "5", "--prefix", "pi-", "--start", "5"); code == 0 ||
		!strings.Contains(errs, "device pi-0007 already exists") || !strings.Contains(errs, "--start 26 ") {
		t.Errorf("batch over a taken id: exit %d %s", code, errs)
	}
	// The next batch of the line goes on from where the first ended.
	out, errs, code := s.cli(t, "token", "create", "--count", "1001", "--prefix", "pi-", "--start", "26", "--json")
	var next []admin.NewToken
	if code != 0 || json.Unmarshal([]byte(out), &next) != nil || len(next) != 1001 ||
		next[0].DeviceID != "pi-0026" || next[1000].DeviceID != "pi-1026" {
		t.Fatalf("second batch with --start 26: exit %d %s, %d tokens", code, errs, len(next))
	}
	if _, errs, code := s.cli(t, "token", "create", "--count", "3"); code != 2 || !strings.Contains(errs, "--count needs --prefix") {
		t.Errorf("--count without --prefix: exit %d %s", code, errs)
	}

	// A CSV path that cannot be written, or that would overwrite an
	// earlier batch's secrets, is refused before any token is minted.
	before, _, _ := s.cli(t, "token", "list", "--json")
	for _, p := range []string{path, filepath.Join(t.TempDir(), "no", "such.csv"), t.TempDir()} {
		if _, errs, code := s.cli(t, "token", "create", "--count", "3", "--prefix", "x-", "--csv", p); code != 1 || errs == "" {
			t.Errorf("--csv %s: %d %s", p, code, errs)
		}
	}
	if after, _, _ := s.cli(t, "token", "list", "--json"); after != before {
		t.Fatalf("refused --csv minted tokens:\n%s", after)
	}
	if rows2, _ := os.ReadFile(path); !strings.Contains(string(rows2), "pi-0025") {
		t.Fatal("the earlier CSV was overwritten")
	}

	// A batch that fails midway (its 1001st id exists) still hands over
	// the 1000 tokens it minted, on stdout without --csv.
	s.enroll(t, s.token(t, "--device", "cc-1001"), "cc-1001")
	out, errs, code = s.cli(t, "token", "create", "--count", "1001", "--prefix", "cc-")
	if code != 1 || !strings.Contains(errs, "1000 tokens were minted before the failure; they are on stdout") ||
		strings.Count(out, "fmq1.") != 1000 || !strings.Contains(out, "cc-1000") {
		t.Fatalf("partial batch: exit %d, %d tokens printed, stderr %s", code, strings.Count(out, "fmq1."), errs)
	}
}

func TestCLIWithoutServer(t *testing.T) {
	s := startServer(t)
	dir := s.cfg.DataDir
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, errs, code := s.cli(t, "device", "list")
	if code != 1 || !strings.Contains(errs, "not running") {
		t.Fatalf("without server: %d %q", code, errs)
	}
	// Modes of what the server left behind.
	for path, want := range map[string]os.FileMode{
		dir:                              0o700,
		filepath.Join(dir, "fleetmq.db"): 0o600,
		filepath.Join(dir, "ca.key"):     0o600,
	} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v (%v)", path, fi.Mode().Perm(), want, err)
		}
	}
}

func TestAdminSocketMode(t *testing.T) {
	s := startServer(t)
	fi, err := os.Stat(s.AdminSocket())
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode %v %v", fi.Mode(), err)
	}
}
