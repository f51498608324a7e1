package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
)

// TestMintingUnknown: when the server does not answer a mint, the
// tokens may be live with their secrets lost, and the error says which.
func TestMintingUnknown(t *testing.T) {
	broken := fmt.Errorf("admin socket /data/admin.sock: %w: %w", admin.ErrNoAnswer, io.ErrUnexpectedEOF)
	refused := &admin.APIError{Status: 503, Code: enroll.CodeUnavailable, Message: "disk full"}
	cases := []struct {
		err  error
		req  admin.TokenRequest
		want string // "" when err must come back unchanged
	}{
		{broken, admin.TokenRequest{Prefix: "bt-e", Start: 9001, Count: 1000}, "bt-e9001 to bt-e10000 may have been minted"},
		{broken, admin.TokenRequest{Prefix: "pi-", Count: 3}, "pi-0001 to pi-0003"},
		{broken, admin.TokenRequest{DeviceID: "pi-7"}, "the token for pi-7 may"},
		{broken, admin.TokenRequest{}, "a token may"},
		{refused, admin.TokenRequest{Prefix: "x", Count: 5}, ""},
		{nil, admin.TokenRequest{}, ""},
	}
	// The client's own errors for a request that never left.
	empty := t.TempDir()
	file := filepath.Join(empty, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, data := range []string{filepath.Join(empty, "missing"), file, empty} {
		_, err := admin.NewClient(filepath.Join(data, admin.SocketName)).CreateTokens(context.Background(), admin.TokenRequest{})
		if err == nil {
			t.Fatalf("%s: minted without a server", data)
		}
		cases = append(cases, struct {
			err  error
			req  admin.TokenRequest
			want string
		}{err, admin.TokenRequest{Prefix: "pi-", Count: 3}, ""})
	}
	for _, c := range cases {
		got := mintingUnknown(c.err, c.req)
		if c.want == "" {
			if got != c.err {
				t.Errorf("%v: changed to %v", c.err, got)
			}
			continue
		}
		if !errors.Is(got, c.err) || !strings.Contains(got.Error(), c.want) || !strings.Contains(got.Error(), "token revoke") {
			t.Errorf("%v %+v = %v, want %q and the cause kept", c.err, c.req, got, c.want)
		}
	}
}

// TestCutOffCommandsSayWhatMayHaveHappened: a state-changing command whose
// answer never comes (the server killed while handling it) says that the
// change may have been made and how to find out; a refusal, or no server
// at all, says no such thing.
func TestCutOffCommandsSayWhatMayHaveHappened(t *testing.T) {
	cut := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		panic(http.ErrAbortHandler) // the server died before answering
	})
	refusing := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"code":"not_found","message":"no identity"}`))
	})
	stopped := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"device", "revoke", "pi-7"}, "pi-7 may have been revoked all the same: `fleetmq device show pi-7`"},
		{[]string{"token", "revoke", "tk1"}, "token tk1 may have been revoked all the same: `fleetmq token list`"},
		{[]string{"token", "create", "--device", "pi-8"}, "the token for pi-8 may have been minted"},
		{[]string{"service", "issue", "svc", "--out", t.TempDir()}, "service svc may have been issued a certificate all the same"},
		{[]string{"operator", "issue", "ann", "--out", t.TempDir()}, "operator ann may have been issued a certificate all the same"},
	} {
		for data, want := range map[string]string{cut: tc.want, refusing: "", stopped: ""} {
			var out, errs bytes.Buffer
			code := Main(context.Background(), append(tc.args, "--data", data), Env{Stdout: &out, Stderr: &errs, Getenv: func(string) string { return "" }})
			got := errs.String()
			if code != 1 || want != "" && !strings.Contains(got, want) || want == "" && strings.Contains(got, "all the same") {
				t.Errorf("%v against %s: exit %d, want 1 and %q:\n%s", tc.args, data, code, want, got)
			}
		}
	}
}

// Without a data folder nothing is sent, so nothing can have been minted:
// the error says where the data folder is, and raises no alarm about
// tokens with lost secrets.
func TestTokenCreateWithoutDataFolder(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "fleetmq-data")
	for _, args := range [][]string{
		{"token", "create"},
		{"token", "create", "--device", "pi-7"},
		{"token", "create", "--count", "1500", "--prefix", "pi-"},
	} {
		_, errs, code := fleetmq(t, missing, args...)
		if code != 1 || !strings.Contains(errs, "no data folder "+missing) || strings.Contains(errs, "may have been minted") {
			t.Errorf("%v: exit %d: %s", args, code, errs)
		}
	}
}

// A token for an id that a usable token is already bound to is refused
// up front, naming that token and the ways out, for one token, a batch
// (nothing of it minted) and a service name; --replace revokes the old
// token in the step that mints the new one.
func TestTokenForAnIDWithALiveToken(t *testing.T) {
	data := startNode(t)
	var first []admin.NewToken
	if err := json.Unmarshal([]byte(mustRun(t, data, "token", "create", "--device", "pi-0002", "--json")), &first); err != nil || len(first) != 1 {
		t.Fatalf("first token: %v", err)
	}
	old := first[0]
	expires := old.ExpiresAt.UTC().Format(admin.TimeLayout)
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"token", "create", "--device", "pi-0002"}, []string{"pi-0002 already has a usable token", old.ID, expires, "fleetmq token revoke " + old.ID, "--replace", "nothing was minted"}},
		{[]string{"token", "create", "--count", "3", "--prefix", "pi-"}, []string{"1 id(s) of this batch", "pi-0002 (token " + old.ID, "--start 3", "--replace", "nothing was minted"}},
		{[]string{"service", "issue", "pi-0002", "--out", t.TempDir()}, []string{"the name pi-0002 has a usable bootstrap token", old.ID, "fleetmq token revoke " + old.ID, "nothing was issued"}},
	} {
		_, errs, code := fleetmq(t, data, tc.args...)
		ok := code == 1
		for _, w := range tc.want {
			ok = ok && strings.Contains(errs, w)
		}
		if !ok {
			t.Errorf("fleetmq %s: exit %d, want 1 and %q:\n%s", strings.Join(tc.args, " "), code, tc.want, errs)
		}
	}
	_, err := admin.NewClient(filepath.Join(data, admin.SocketName)).CreateTokens(context.Background(), admin.TokenRequest{DeviceID: "pi-0002"})
	if apiErr := (*admin.APIError)(nil); !errors.As(err, &apiErr) || apiErr.Status != http.StatusConflict || apiErr.Code != enroll.CodeIDHasToken {
		t.Errorf("admin API: %v, want 409 id_has_token", err)
	}
	var list []admin.TokenInfo
	if err := json.Unmarshal([]byte(mustRun(t, data, "token", "list", "--json")), &list); err != nil || len(list) != 1 {
		t.Fatalf("the refusals minted tokens: %v %+v", err, list)
	}

	mustRun(t, data, "token", "create", "--device", "pi-0002", "--replace")
	mustRun(t, data, "token", "create", "--count", "3", "--prefix", "pi-", "--replace")
	if err := json.Unmarshal([]byte(mustRun(t, data, "token", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	states := map[string]int{}
	for _, tk := range list {
		states[tk.DeviceID+" "+tk.State]++
	}
	if len(list) != 5 || states["pi-0002 revoked"] != 2 || states["pi-0002 active"] != 1 || states["pi-0001 active"] != 1 || states["pi-0003 active"] != 1 {
		t.Errorf("after --replace: %v", states)
	}
	if out := mustRun(t, data, "audit", "--json"); !strings.Contains(out, "replaced by token") {
		t.Errorf("the replacement is not audited:\n%s", out)
	}
}
