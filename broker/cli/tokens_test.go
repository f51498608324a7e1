package cli

import (
	"bytes"
	"context"
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
