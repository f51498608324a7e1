package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
)

// A list that cannot be revoked whole is refused before anything is sent,
// with where the fault is; the server holds to the same bound.
func TestRevokeListRefusals(t *testing.T) {
	data := startNode(t)
	mustRun(t, data, "service", "issue", "backend", "--out", t.TempDir())
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	var big strings.Builder
	ids := make([]string, admin.MaxRevokesPerRequest+1)
	for i := range ids {
		ids[i] = fmt.Sprintf("pi-%05d", i)
		fmt.Fprintln(&big, ids[i])
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"device", "revoke"}, 2, "fleetmq device revoke needs ID: fleetmq device revoke ID [ID...], or --from FILE"},
		{[]string{"device", "revoke", "backend", ".."}, 2, `".." is not an ID`},
		{[]string{"device", "revoke", "backend", "a/b"}, 2, "argument 2: id has a character other than"},
		{[]string{"device", "revoke", "--from", write("bad.txt", "backend\n# a comment\nInline\n")}, 2, "bad.txt line 3: id must be lower case"},
		{[]string{"device", "revoke", "--from", write("empty.txt", "# nothing\n\n")}, 2, "no ids to revoke in " + filepath.Join(dir, "empty.txt")},
		{[]string{"device", "revoke", "--from", filepath.Join(dir, "missing.txt")}, 1, "read the ids to revoke: open " + filepath.Join(dir, "missing.txt")},
		{[]string{"device", "revoke", "--from", write("big.txt", big.String())}, 2, "10001 ids to revoke; at most 10000 at a time: split the list"},
		{[]string{"device", "revoke", "--from", write("long.txt", "backend\n"+strings.Repeat("a", 70000)+"\n")}, 2, "long.txt line 2: over 65536 bytes, not an id"},
	} {
		_, errs, code := fleetmq(t, data, tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d: %s\nwant exit %d and %q", tc.args, code, errs, tc.code, tc.want)
		}
	}
	if info, err := admin.NewClient(filepath.Join(data, admin.SocketName)).Device(context.Background(), "backend"); err != nil || info.Revoked() {
		t.Fatalf("backend after refused lists: %+v %v", info, err)
	}
	// The server refuses what a client other than this CLI might send.
	c := admin.NewClient(filepath.Join(data, admin.SocketName))
	var apiErr *admin.APIError
	if _, err := c.RevokeDevices(context.Background(), ids); !errors.As(err, &apiErr) || apiErr.Code != enroll.CodeBadRequest || !strings.Contains(apiErr.Message, "at most 10000 per request") {
		t.Errorf("%d ids: %v", len(ids), err)
	}
	if _, err := c.RevokeDevices(context.Background(), []string{"backend", "Backend"}); !errors.As(err, &apiErr) || apiErr.Code != enroll.CodeIDInvalid || !strings.Contains(apiErr.Message, "id 2 of 2") {
		t.Errorf("malformed id: %v", err)
	}
	if _, err := c.RevokeDevices(context.Background(), nil); !errors.As(err, &apiErr) || apiErr.Code != enroll.CodeBadRequest {
		t.Errorf("no ids: %v", err)
	}
	out, errs, code := fleetmq(t, data, "device", "revoke", "-h")
	if code != 0 || !strings.Contains(out+errs, "nothing is revoked") || !strings.Contains(out+errs, "-from") {
		t.Errorf("device revoke -h: exit %d: %s%s", code, out, errs)
	}
}

// A list saved by Windows tools (a byte order mark, CRLF line ends) is
// read as its ids: the mark refused the first line as "id must start with
// a lower-case letter or a digit", a character the operator cannot see.
func TestRevokeListWithByteOrderMark(t *testing.T) {
	data := startNode(t)
	mustRun(t, data, "service", "issue", "backend", "--out", t.TempDir())
	list := filepath.Join(t.TempDir(), "ids.txt")
	if err := os.WriteFile(list, []byte("\uFEFFbackend\r\n\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errs, code := fleetmq(t, data, "device", "revoke", "--from", list)
	if code != 0 || !strings.Contains(out, "backend revoked") {
		t.Fatalf("revoke --from a file with a BOM: exit %d: %s%s", code, out, errs)
	}
}
