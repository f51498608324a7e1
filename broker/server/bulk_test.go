package server_test

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/server"
)

// TestBulkTokensInChunks mints more tokens than one admin request carries:
// the ids run on across the chunks as one batch.
func TestBulkTokensInChunks(t *testing.T) {
	s := startServer(t)
	path := filepath.Join(t.TempDir(), "line.csv")
	if _, errs, code := s.cli(t, "token", "create", "--count", "2500", "--prefix", "pi-", "--csv", path); code != 0 {
		t.Fatalf("bulk create: %s", errs)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil || len(rows) != 2501 {
		t.Fatalf("csv: %v, %d rows", err, len(rows))
	}
	secrets := map[string]bool{}
	for i, r := range rows[1:] {
		if want := "pi-" + pad4(i+1); r[0] != want {
			t.Fatalf("row %d: id %q, want %q", i+1, r[0], want)
		}
		secrets[r[1]] = true
	}
	if len(secrets) != 2500 {
		t.Fatalf("%d distinct secrets for 2500 tokens", len(secrets))
	}
	toks, err := admin.NewClient(s.AdminSocket()).Tokens(context.Background())
	if err != nil || len(toks) != 2500 {
		t.Fatalf("stored tokens: %d %v", len(toks), err)
	}
	// A token of the third chunk enrolls the id it was minted for.
	if d := s.enroll(t, rows[2400][1], ""); d.resp.DeviceID != "pi-2400" {
		t.Fatalf("enrolled %q", d.resp.DeviceID)
	}

	// The numbering the CLI uses for chunks, directly.
	c := admin.NewClient(s.AdminSocket())
	got, err := c.CreateTokens(context.Background(), admin.TokenRequest{Count: 2, Prefix: "x-", Start: 9_999})
	if err != nil || len(got) != 2 || got[0].DeviceID != "x-9999" || got[1].DeviceID != "x-10000" {
		t.Fatalf("start: %v %+v", err, got)
	}
	for _, bad := range []admin.TokenRequest{
		{Start: 5},
		{Count: 1, Start: -1},
		{Count: 2, Start: 999_999_999},
	} {
		var apiErr *admin.APIError
		if _, err := c.CreateTokens(context.Background(), bad); !errors.As(err, &apiErr) || apiErr.Status != 400 {
			t.Errorf("%+v: %v, want 400", bad, err)
		}
	}
}

func pad4(n int) string { return fmt.Sprintf("%04d", n) }

// TestDeviceListFilters checks --online, --revoked and --expiring, alone
// and together.
func TestDeviceListFilters(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.CertLifetime = 3 * 24 * time.Hour })
	a := s.enroll(t, s.token(t), "pi-a")
	s.enroll(t, s.token(t), "pi-b")
	s.enroll(t, s.token(t), "pi-c")
	c := pahoClient(t, s, a, "pi-a", nil)
	defer c.Disconnect(0)
	if _, errs, code := s.cli(t, "device", "revoke", "pi-c"); code != 0 {
		t.Fatal(errs)
	}
	list := func(args ...string) []string {
		t.Helper()
		out, errs, code := s.cli(t, append([]string{"device", "list", "--json"}, args...)...)
		if code != 0 {
			t.Fatalf("device list %v: %s", args, errs)
		}
		var devs []admin.DeviceInfo
		if err := json.Unmarshal([]byte(out), &devs); err != nil {
			t.Fatalf("device list %v: %v\n%s", args, err, out)
		}
		ids := []string{}
		for _, d := range devs {
			ids = append(ids, d.ID)
		}
		return ids
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"pi-a", "pi-b", "pi-c"}},
		{[]string{"--online"}, []string{"pi-a"}},
		{[]string{"--revoked"}, []string{"pi-c"}},
		{[]string{"--expiring", "7d"}, []string{"pi-a", "pi-b"}},
		{[]string{"--expiring", "2d"}, []string{}},
		{[]string{"--online", "--expiring", "7d"}, []string{"pi-a"}},
		{[]string{"--online", "--revoked"}, []string{}},
	} {
		if got := list(tc.args...); !slices.Equal(got, tc.want) {
			t.Errorf("device list %v: %v, want %v", tc.args, got, tc.want)
		}
	}
}
