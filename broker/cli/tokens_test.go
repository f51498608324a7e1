package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
)

// TestMintingUnknown: when the server does not answer a mint, the
// tokens may be live with their secrets lost, and the error says which.
func TestMintingUnknown(t *testing.T) {
	broken := fmt.Errorf("admin socket /data/admin.sock: %w", io.ErrUnexpectedEOF)
	refused := &admin.APIError{Status: 503, Code: enroll.CodeUnavailable, Message: "disk full"}
	cases := []struct {
		err  error
		req  admin.TokenRequest
		want string // "" when err must come back unchanged
	}{
		{broken, admin.TokenRequest{Prefix: "bt-e", Start: 7001, Count: 1000, Width: 6}, "bt-e007001 to bt-e008000 may have been minted"},
		{broken, admin.TokenRequest{Prefix: "pi-", Count: 3}, "pi-0001 to pi-0003"},
		{broken, admin.TokenRequest{DeviceID: "pi-7"}, "the token for pi-7 may"},
		{broken, admin.TokenRequest{}, "a token may"},
		{refused, admin.TokenRequest{Prefix: "x", Count: 5}, ""},
		{fmt.Errorf("%w: /data/admin.sock", admin.ErrNotRunning), admin.TokenRequest{}, ""},
		{nil, admin.TokenRequest{}, ""},
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
