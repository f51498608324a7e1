package cli

import (
	"strings"
	"testing"
)

// What the operator reads when a command refuses: the flag names they
// typed, limits in the units they use, what the missing argument is, and
// "already revoked" rather than a bare code.
func TestOperatorMessages(t *testing.T) {
	data := startNode(t)
	mustRun(t, data, "token", "create")
	tok := strings.Fields(strings.Split(mustRun(t, data, "token", "list"), "\n")[1])
	mustRun(t, data, "token", "revoke", tok[0])
	mustRun(t, data, "service", "issue", "backend", "--out", t.TempDir())
	mustRun(t, data, "device", "revoke", "backend")
	for _, tc := range []struct {
		args []string
		code int
		want []string
		not  string
	}{
		{[]string{"token", "revoke", tok[0]}, 1, []string{"token " + tok[0] + " was already revoked; nothing changed"}, ""},
		{[]string{"device", "revoke", "backend"}, 1, []string{"backend was already revoked; nothing changed"}, ""},
		{[]string{"token", "create", "--count", "2", "--prefix", "gh-", "--device", "foo"}, 2, []string{"--count", "--device"}, "device_id"},
		// Caught by the server, not the CLI: a usage error all the same.
		{[]string{"token", "create", "--ttl", "400d"}, 2, []string{"up to 365d"}, "8760h"},
		{[]string{"audit", "--since", "yesterday"}, 2, []string{"2026-12-07 20:26:32 UTC", "RFC 3339", "7d"}, ""},
		{[]string{"token", "create", "--device", "Bad/Id"}, 2, []string{"id_invalid"}, ""},
		{[]string{"device", "show", "nobody"}, 1, []string{`no identity "nobody"`}, ""},
		{[]string{"token", "list", "--limit", "5", "--all"}, 2, []string{"--limit and --all"}, ""},
		{[]string{"token", "create", "--replace"}, 2, []string{"--replace goes with --device or --count"}, ""},
		{[]string{"token", "revoke"}, 2, []string{"fleetmq token revoke needs ID"}, "argument(s)"},
		{[]string{"device", "show", "a", "b"}, 2, []string{"takes one ID"}, "argument(s)"},
		// Paths of the admin API cannot carry these: "." named the list.
		{[]string{"device", "show", "."}, 2, []string{`"." is not an ID`, "fleetmq device list"}, "decode"},
		{[]string{"device", "revoke", ".."}, 2, []string{`".." is not an ID`}, "endpoint"},
		{[]string{"token", "revoke", ""}, 2, []string{`"" is not an ID`, "fleetmq token list"}, "endpoint"},
		{[]string{"dashboard"}, 1, []string{"the dashboard is off", "--ui-addr"}, "(not_found)"},
		{[]string{"serve", "--log-level", "verbose"}, 2, []string{`"verbose"`, "debug, info, warn or error"}, ""},
	} {
		_, errs, code := fleetmq(t, data, tc.args...)
		ok := code == tc.code && (tc.not == "" || !strings.Contains(errs, tc.not))
		for _, w := range tc.want {
			ok = ok && strings.Contains(errs, w)
		}
		if !ok {
			t.Errorf("fleetmq %s: exit %d: %s", strings.Join(tc.args, " "), code, errs)
		}
	}
}
