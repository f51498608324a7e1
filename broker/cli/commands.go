package cli

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/ui"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table(w io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		cells := make([]string, len(r))
		for i, c := range r {
			cells[i] = terminalSafe(c)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// terminalSafe quotes control characters (escape sequences, newlines,
// tabs), which would otherwise let a value in the store — a label, or a
// field of an audit record an attacker caused — rewrite what an operator
// sees in the terminal or break the table.
func terminalSafe(s string) string {
	// Bidirectional controls reorder what the terminal shows; the line
	// and paragraph separators (U+2028, U+2029) break a line where a
	// reader takes the next one for the server's.
	if strings.IndexFunc(s, func(r rune) bool {
		return unicode.IsControl(r) || r == utf8.RuneError || unicode.Is(unicode.Bidi_Control, r) ||
			unicode.In(r, unicode.Zl, unicode.Zp)
	}) < 0 {
		return s
	}
	q := strconv.QuoteToGraphic(s)
	return q[1 : len(q)-1]
}

// fmtTime prints times in UTC, labelled, as the dashboard, the JSON, the
// CSV and the agent do: a local time without its zone misled whoever
// compared them.
func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(admin.TimeLayout)
}

func labelsString(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + l[k]
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func tokenCreate(ctx context.Context, args []string, env Env) error {
	fs := newFlags("token create", env)
	var req admin.TokenRequest
	fs.StringVar(&req.DeviceID, "device", "", "bind the token to this device id (default: the CSR's CN becomes the id)")
	fs.BoolVar(&req.Reprovision, "reprovision", false, "with --device: let the token enroll that existing device again (new key and certificate)")
	fs.IntVar(&req.Uses, "uses", 1, "how many enrollments the token allows")
	ttl := 24 * time.Hour
	fs.Var(durationValue{&ttl}, "ttl", "how long the token is valid, at most 365d (e.g. 24h, 7d)")
	var labels []string
	fs.Var(listValue{&labels}, "label", "k=v label recorded on the token and the devices it enrolls (repeatable)")
	fs.IntVar(&req.Count, "count", 0, "mint this many tokens, bound to ids PREFIX0001…")
	fs.StringVar(&req.Prefix, "prefix", "", "id prefix for --count (e.g. pi-)")
	start := fs.Int("start", 1, "with --count: number of the first id, to mint another batch with the same prefix")
	fs.BoolVar(&req.Replace, "replace", false, "revoke the usable tokens already bound to the ids, in the step that mints the new ones (without it such an id is refused)")
	csvPath := fs.String("csv", "", "write the tokens to this new file (mode 0600) as id,token,expires_at rather than to stdout; a free token's id is empty")
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	if req.Uses < 1 {
		return usagef("--uses must be at least 1")
	}
	req.TTL = ttl.String()
	if len(labels) > 0 {
		req.Labels = map[string]string{}
		for _, l := range labels {
			k, v, ok := strings.Cut(l, "=")
			if !ok || k == "" {
				return usagef("--label wants k=v, got %q", l)
			}
			if !utf8.ValidString(l) {
				return usagef("--label %q is not UTF-8 text", l)
			}
			if _, dup := req.Labels[k]; dup {
				return usagef("--label %s given twice", k)
			}
			req.Labels[k] = v
		}
	}
	if fs.given("count") && req.Count < 1 {
		return usagef("--count must be at least 1")
	}
	if req.Prefix != "" && req.Count == 0 {
		return usagef("--prefix goes with --count")
	}
	if req.Count > 0 && req.Prefix == "" {
		return usagef("--count needs --prefix: the ids are PREFIX0001, PREFIX0002, …")
	}
	if fs.given("start") && (req.Count == 0 || *start < 1 || *start > math.MaxInt32-maxBulkTokens) {
		return usagef("--start goes with --count and is at least 1")
	}
	if req.Count > 0 {
		req.Start = *start
	}
	if req.Reprovision && req.DeviceID == "" {
		return usagef("--reprovision needs --device")
	}
	if req.Replace && req.DeviceID == "" && req.Count == 0 {
		return usagef("--replace goes with --device or --count: a free token is bound to no id, so it replaces no token")
	}
	if req.Count > 0 && req.DeviceID != "" {
		return usagef("--count and --prefix bind each token to its own id: leave out --device (and --reprovision)")
	}
	if req.Count > maxBulkTokens {
		return usagef("--count is at most %d", maxBulkTokens)
	}
	if *csvPath != "" {
		// Claim the file before minting: once minted, a token's secret
		// exists only in this process, so a path that cannot be written
		// (no such folder, a file already there: an earlier batch's
		// secrets) must be refused while nothing is live yet.
		f, err := os.OpenFile(*csvPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("%s exists; a token file is never overwritten (it may hold live secrets): choose a new name", *csvPath)
			}
			return fmt.Errorf("cannot create %s: %w", *csvPath, err)
		}
		f.Close()
	}
	toks, err := createTokens(ctx, fs.client(), req, newProgress(env.Stderr, "minting tokens", req.Count))
	if err != nil && len(toks) == 0 {
		if *csvPath != "" {
			os.Remove(*csvPath)
		}
		return err
	}
	if err != nil {
		// The tokens minted so far are live: hand over their secrets
		// before saying what failed.
		where, perr := printTokens(env, toks, *csvPath, *fs.json)
		if perr != nil {
			return fmt.Errorf("%w; and the %d tokens minted before the failure could not be written: %v", err, len(toks), perr)
		}
		return fmt.Errorf("%w (%d tokens were minted before the failure; they are %s)", err, len(toks), where)
	}
	_, err = printTokens(env, toks, *csvPath, *fs.json)
	return err
}

// printTokens hands newly minted tokens to the operator: into the CSV file
// at path (claimed beforehand) or on stdout, and says where they went.
// Should the file fail at this point (a full disk), the secrets go to
// stdout rather than nowhere.
func printTokens(env Env, toks []admin.NewToken, path string, asJSON bool) (string, error) {
	if path != "" {
		err := writeTokenCSV(path, toks)
		if err == nil {
			noun := "tokens"
			if len(toks) == 1 {
				noun = "token"
			}
			fmt.Fprintf(env.Stderr, "wrote %d %s to %s\n", len(toks), noun, path)
			if asJSON {
				// The records without their secrets, which are in the file only.
				recs := make([]store.Token, len(toks))
				for i, t := range toks {
					recs[i] = t.Token
				}
				return "in " + path, printJSON(env.Stdout, recs)
			}
			return "in " + path, nil
		}
		os.Remove(path)
		fmt.Fprintf(env.Stderr, "fleetmq: %v; the tokens follow on stdout instead\n", err)
		asJSON = false
	}
	return "on stdout", writeTokens(env, toks, asJSON, path == "")
}

func writeTokens(env Env, toks []admin.NewToken, asJSON, single bool) error {
	if asJSON {
		return printJSON(env.Stdout, toks)
	}
	if len(toks) == 1 && single {
		t := toks[0]
		fmt.Fprintln(env.Stdout, t.Secret)
		what := "device " + orDash(t.DeviceID)
		if t.Reprovision {
			what = "re-provisions device " + t.DeviceID
		}
		fmt.Fprintf(env.Stderr, "token %s: %s, %d use(s), expires %s\n", t.ID, what, t.MaxUses, fmtTime(t.ExpiresAt))
		return nil
	}
	rows := make([][]string, len(toks))
	for i, t := range toks {
		rows[i] = []string{t.DeviceID, t.Secret, fmtTime(t.ExpiresAt)}
	}
	return table(env.Stdout, "DEVICE\tTOKEN\tEXPIRES", rows)
}

// Bulk creation limits: one admin request per chunk keeps each request,
// its transaction and its answer small, and lets a terminal show progress.
const (
	tokenChunk    = 1000
	maxBulkTokens = 1_000_000
)

// createTokens mints req's tokens, a chunk per admin request when
// req.Count is large, with ids numbered as one batch. On error it returns
// the tokens minted by the chunks that succeeded.
func createTokens(ctx context.Context, c *admin.Client, req admin.TokenRequest, bar *progress) ([]admin.NewToken, error) {
	if req.Count <= tokenChunk {
		toks, err := c.CreateTokens(ctx, req)
		return toks, mintingUnknown(err, req)
	}
	total, first := req.Count, max(req.Start, 1)
	out := make([]admin.NewToken, 0, total)
	bar.set(0)
	defer bar.finish()
	for done := 0; done < total; done += tokenChunk {
		req.Start, req.Count = first+done, min(tokenChunk, total-done)
		toks, err := c.CreateTokens(ctx, req)
		if err != nil {
			return out, fmt.Errorf("minting tokens %d to %d of %d: %w", done+1, done+req.Count, total, mintingUnknown(err, req))
		}
		out = append(out, toks...)
		bar.set(len(out))
	}
	return out, nil
}

// mintingUnknown adds to err, when the server did not answer, that req
// may have been minted all the same: its secrets are then lost, and the
// tokens live until revoked.
func mintingUnknown(err error, req admin.TokenRequest) error {
	what := "a token"
	switch {
	case req.Prefix != "":
		start := max(req.Start, 1)
		what = fmt.Sprintf("the tokens for %s to %s", admin.BatchID(req.Prefix, start), admin.BatchID(req.Prefix, start+req.Count-1))
	case req.DeviceID != "":
		what = "the token for " + req.DeviceID
	}
	return unansweredf(err, "%s may have been minted with secrets no one has: "+
		"look for them with `fleetmq token list` and revoke them (`fleetmq token revoke ID`)", what)
}

// unansweredf adds to err, when the server took a request but its answer
// never came (admin.ErrNoAnswer), what may have been done all the same and
// how to find out: the operator must not take the error for "nothing
// happened". Any other error comes back unchanged.
func unansweredf(err error, format string, args ...any) error {
	if !errors.Is(err, admin.ErrNoAnswer) {
		return err
	}
	return fmt.Errorf("%w; "+format, append([]any{err}, args...)...)
}

func writeTokenCSV(path string, toks []admin.NewToken) error {
	var b strings.Builder
	w := csv.NewWriter(&b)
	w.Write([]string{"id", "token", "expires_at"})
	for _, t := range toks {
		w.Write([]string{t.DeviceID, t.Secret, t.ExpiresAt.UTC().Format(time.RFC3339)})
	}
	w.Flush()
	if err := w.Error(); err != nil {
		return err
	}
	// The file holds live secrets.
	return enroll.WriteFileAtomic(path, []byte(b.String()), 0o600)
}

func tokenList(ctx context.Context, args []string, env Env) error {
	fs := newFlags("token list", env)
	limit := fs.Int("limit", 100, "newest N tokens")
	all := fs.Bool("all", false, "every token, however many (a production line mints thousands)")
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	if *limit < 1 {
		return usagef("--limit must be at least 1 (or use --all)")
	}
	if *all && fs.given("limit") {
		// Which one was meant is not for us to guess: --all printed
		// thousands of rows to someone who asked for a few.
		return usagef("--limit and --all do not go together: give one")
	}
	toks, err := fs.client().Tokens(ctx)
	if err != nil {
		return err
	}
	if !*all && len(toks) > *limit {
		// On stderr: stdout stays valid for --json.
		fmt.Fprintf(env.Stderr, "the newest %d of %d tokens; --limit N or --all for more\n", *limit, len(toks))
		toks = toks[:*limit] // newest first
	}
	if *fs.json {
		return printJSON(env.Stdout, toks)
	}
	rows := make([][]string, len(toks))
	for i, t := range toks {
		dev := orDash(t.DeviceID)
		if t.Reprovision {
			dev += " (re-provision)"
		}
		state := t.State
		if t.Why != "" {
			state += ": " + t.Why
		}
		rows[i] = []string{t.ID, dev, fmt.Sprintf("%d/%d", t.Uses, t.MaxUses), fmtTime(t.ExpiresAt), labelsString(t.Labels), state}
	}
	// STATE last: an unusable token's reason is long.
	return table(env.Stdout, "ID\tDEVICE\tUSES\tEXPIRES\tLABELS\tSTATE", rows)
}

func tokenRevoke(ctx context.Context, args []string, env Env) error {
	fs := newFlags("token revoke", env)
	if err := fs.parse(args, 1); err != nil {
		return err
	}
	t, err := fs.client().RevokeToken(ctx, fs.Arg(0))
	if err != nil {
		return unansweredf(err, "token %s may have been revoked all the same: `fleetmq token list` shows its state; revoke it again if it is not", fs.Arg(0))
	}
	if *fs.json {
		return printJSON(env.Stdout, t)
	}
	fmt.Fprintf(env.Stdout, "token %s revoked\n", t.ID)
	return nil
}

func deviceList(ctx context.Context, args []string, env Env) error {
	fs := newFlags("device list", env)
	online := fs.Bool("online", false, "only devices connected now")
	revoked := fs.Bool("revoked", false, "only revoked devices")
	var expiring time.Duration
	fs.Var(durationValue{&expiring}, "expiring", "only devices whose certificate expires within this time (e.g. 7d)")
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	devs, err := fs.client().Devices(ctx)
	if err != nil {
		return err
	}
	now := time.Now()
	kept := devs[:0]
	for _, d := range devs {
		if *online && !d.Online || *revoked && !d.Revoked() {
			continue
		}
		// Given as 0 it means "already expired", not "no filter".
		if fs.given("expiring") && (d.Revoked() || d.NotAfter.After(now.Add(expiring))) {
			continue
		}
		kept = append(kept, d)
	}
	if *fs.json {
		return printJSON(env.Stdout, kept)
	}
	rows := make([][]string, len(kept))
	for i, d := range kept {
		rows[i] = []string{d.ID, string(d.Role), d.State(), fmtTime(d.LastSeen), fmtTime(d.NotAfter)}
	}
	return table(env.Stdout, "ID\tROLE\tSTATE\tLAST SEEN\tCERT EXPIRES", rows)
}

func deviceShow(ctx context.Context, args []string, env Env) error {
	fs := newFlags("device show", env)
	if err := fs.parse(args, 1); err != nil {
		return err
	}
	d, err := fs.client().Device(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	if *fs.json {
		return printJSON(env.Stdout, d)
	}
	err = table(env.Stdout, "FIELD\tVALUE", [][]string{
		{"id", d.ID}, {"role", string(d.Role)}, {"state", d.State()},
		{"created", fmtTime(d.CreatedAt)}, {"last seen", fmtTime(d.LastSeen)},
		{"serial", d.Serial}, {"cert expires", fmtTime(d.NotAfter)},
		{"last renewal", fmtTime(d.LastRenewal)}, {"revoked", fmtTime(d.RevokedAt)},
		{"token", orDash(d.TokenID)}, {"labels", labelsString(d.Labels)},
	})
	if err != nil || len(d.Certificates) == 0 {
		return err
	}
	now := time.Now()
	rows := make([][]string, len(d.Certificates))
	for i, c := range d.Certificates {
		state := d.CertState(c, now)
		if c.Revoked() {
			state += " " + fmtTime(c.RevokedAt)
		}
		rows[i] = []string{c.Serial, fmtTime(c.IssuedAt), fmtTime(c.NotAfter), state}
	}
	fmt.Fprintln(env.Stdout)
	return table(env.Stdout, "CERTIFICATE\tISSUED\tEXPIRES\tSTATE", rows)
}

// revokeHelp is `fleetmq device revoke -h`: the semantics of a list.
const revokeHelp = `Usage: fleetmq device revoke ID [ID...] [--from FILE|-] [flags]

Revokes identities (devices, services, operators) and all their
certificates: their live sessions are closed within a second, their
retained status is removed, and the CRL lists their certificates.

Several ids, given as arguments and/or in FILE (- for stdin: one id per
line, blank lines and lines starting with # skipped), are revoked in one
request, in one transaction, with one CRL rebuild, at most %d at a time.
A malformed id (exit 2) or one that names no identity (exit 1) refuses the
whole list: nothing is revoked. An id already revoked is reported as such
and the others are revoked, with exit 1, so that a list can be run again
after an interruption. A repeated id counts once. One line per id, then a
summary; --json prints one record per id instead.

Flags:
`

func deviceRevoke(ctx context.Context, args []string, env Env) error {
	fs := newFlags("device revoke", env)
	from := fs.String("from", "", "also revoke the ids in this file, one per line (blank lines and # comments skipped); - reads stdin")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), revokeHelp, admin.MaxRevokesPerRequest)
		fs.PrintDefaults()
	}
	if err := fs.parse(args, anyArgs); err != nil {
		return err
	}
	switch {
	case fs.NArg() == 0 && *from == "":
		return usagef("fleetmq device revoke needs ID: fleetmq device revoke ID [ID...], or --from FILE")
	case fs.NArg() > 1 || *from != "":
		return revokeMany(ctx, fs, *from, env)
	}
	res, err := fs.client().RevokeDevice(ctx, fs.Arg(0))
	if err != nil {
		return unansweredf(err, "%s may have been revoked all the same: `fleetmq device show %s` shows its state; revoke it again if it is not", fs.Arg(0), fs.Arg(0))
	}
	if *fs.json {
		return printJSON(env.Stdout, res)
	}
	fmt.Fprintf(env.Stdout, "%s revoked (%d certificate(s)); its sessions are closed and the CRL is updated\n", res.DeviceID, len(res.Serials))
	return nil
}

// revokeMany revokes the ids of fs's arguments and of the file from in
// one request.
func revokeMany(ctx context.Context, fs flagSet, from string, env Env) error {
	ids, err := revokeList(fs.Args(), from, env.Stdin)
	if err != nil {
		return err
	}
	res, err := fs.client().RevokeDevices(ctx, ids)
	if err != nil {
		return unansweredf(err, "the %d ids may have been revoked all the same: `fleetmq device list --revoked` shows those revoked; "+
			"run the same command again: an id already revoked is reported as such, the others are revoked", len(ids))
	}
	already := 0
	for _, r := range res {
		if r.Result == admin.ResultAlreadyRevoked {
			already++
		}
	}
	if *fs.json {
		if err := printJSON(env.Stdout, res); err != nil {
			return err
		}
	} else {
		for _, r := range res {
			if r.Result == admin.ResultAlreadyRevoked {
				fmt.Fprintf(env.Stdout, "%s was already revoked (%s); nothing changed\n", r.DeviceID, fmtTime(r.RevokedAt))
				continue
			}
			fmt.Fprintf(env.Stdout, "%s revoked (%d certificate(s))\n", r.DeviceID, len(r.Serials))
		}
		if already < len(res) {
			fmt.Fprintf(env.Stdout, "%d revoked, %d already revoked; the sessions of those revoked are closed and the CRL is updated\n", len(res)-already, already)
		} else {
			fmt.Fprintf(env.Stdout, "0 revoked, %d already revoked\n", already)
		}
	}
	if already == len(res) {
		return fmt.Errorf("all %d ids were already revoked before: nothing changed", already)
	}
	if already > 0 {
		return fmt.Errorf("%d of the %d ids already revoked before: nothing changed for those (listed above); the others are revoked", already, len(res))
	}
	return nil
}

// revokeList gathers the ids to revoke: args, then the lines of the file
// from (stdin for "-"), blank lines and # comments skipped, each id once.
// It refuses what the server would, with where it is, before anything is
// sent: a list is revoked whole or not at all.
func revokeList(args []string, from string, stdin io.Reader) ([]string, error) {
	var ids []string
	seen := map[string]bool{}
	add := func(id, where string) error {
		if err := enroll.ValidateID(id); err != nil {
			return usagef("%s: %s; nothing was revoked", where, enroll.AsError(err).Message)
		}
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
		return nil
	}
	for i, id := range args {
		if err := add(id, fmt.Sprintf("argument %d", i+1)); err != nil {
			return nil, err
		}
	}
	if from != "" {
		name, r := from, stdin
		if from == "-" {
			name = "stdin"
		} else {
			f, err := os.Open(from)
			if err != nil {
				return nil, fmt.Errorf("read the ids to revoke: %w (nothing was revoked)", err)
			}
			defer f.Close()
			r = f
		}
		sc := bufio.NewScanner(r)
		line := 0
		for sc.Scan() {
			line++
			text := sc.Text()
			if line == 1 {
				// Notepad and Excel's "UTF-8" CSV begin the file
				// with a byte order mark: no part of the first id.
				text = strings.TrimPrefix(text, "\uFEFF")
			}
			id := strings.TrimSpace(text)
			if id == "" || strings.HasPrefix(id, "#") {
				continue
			}
			if err := add(id, fmt.Sprintf("%s line %d", name, line)); err != nil {
				return nil, err
			}
		}
		if err := sc.Err(); errors.Is(err, bufio.ErrTooLong) {
			return nil, usagef("%s line %d: over %d bytes, not an id (one id per line); nothing was revoked", name, line+1, bufio.MaxScanTokenSize)
		} else if err != nil {
			return nil, fmt.Errorf("read the ids to revoke from %s, after line %d: %w (nothing was revoked)", name, line, err)
		}
		if len(ids) == 0 {
			return nil, usagef("no ids to revoke in %s (one per line; blank lines and # comments are skipped)", name)
		}
	}
	if len(ids) > admin.MaxRevokesPerRequest {
		return nil, usagef("%d ids to revoke; at most %d at a time: split the list (nothing was revoked)", len(ids), admin.MaxRevokesPerRequest)
	}
	return ids, nil
}

// identityIssue makes the key here, sends only a CSR, and writes NAME.key
// (0600), NAME.pem and ca.pem into --out.
func identityIssue(role string) func(context.Context, []string, Env) error {
	return func(ctx context.Context, args []string, env Env) error {
		fs := newFlags(role+" issue", env)
		out := fs.String("out", ".", "folder to write NAME.key, NAME.pem and ca.pem into")
		renew := fs.Bool("renew", false, "a new key and certificate for the existing "+role+" NAME; its earlier certificates stay valid until they expire")
		if err := fs.parse(args, 1); err != nil {
			return err
		}
		name := fs.Arg(0)
		if err := enroll.ValidateID(name); err != nil {
			e := enroll.AsError(err) // worded as the server's refusals are
			return usagef("%s (%s)", e.Message, e.Code)
		}
		if name == "ca" {
			// Its certificate, ca.pem, would be overwritten by the CA's.
			return usagef("the name ca is where the CA goes (ca.pem); choose another")
		}
		// Everything that can fail here is tried before the server
		// issues anything: ids are for life, so a certificate issued for a
		// key that was then not written would burn the name.
		_, statErr := os.Stat(*out)
		if err := os.MkdirAll(*out, 0o700); err != nil {
			return fmt.Errorf("--out: %w", err)
		}
		done := false
		if errors.Is(statErr, os.ErrNotExist) {
			// A refusal leaves no empty folder behind.
			defer func() {
				if !done {
					_ = os.Remove(*out)
				}
			}()
		}
		keyPath := filepath.Join(*out, name+".key")
		certPath := filepath.Join(*out, name+".pem")
		caPath := filepath.Join(*out, "ca.pem")
		for _, p := range []string{keyPath, certPath} {
			if _, err := os.Lstat(p); err == nil {
				if *renew {
					// The files in use stay as they are until the new
					// pair is deployed.
					return fmt.Errorf("%s exists; refusing to overwrite it: write the renewed pair elsewhere with --out DIR, deploy it, then remove the old files", p)
				}
				return fmt.Errorf("%s exists; refusing to overwrite it", p)
			}
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := enroll.WriteFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
			return err
		}
		csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
		if err != nil {
			os.Remove(keyPath)
			return err
		}
		res, err := fs.client().IssueIdentity(ctx, admin.IdentityRequest{
			Name: name, Role: store.Role(role), Renew: *renew,
			CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		})
		if err != nil {
			// Without its certificate the key is of no use, issued or not.
			os.Remove(keyPath)
			return unansweredf(err, "%s %s may have been issued a certificate all the same: if `fleetmq device show %s` lists it, run this command again with --renew", role, name, name)
		}
		files := []struct {
			path string
			data []byte
		}{{certPath, []byte(res.Certificate)}, {caPath, []byte(res.CA)}}
		for _, f := range files {
			if err := enroll.WriteFileAtomic(f.path, f.data, 0o644); err != nil {
				// The key is safe; the certificate exists only here now.
				fmt.Fprint(env.Stdout, res.Certificate, res.CA)
				return fmt.Errorf("%w; the certificate and CA are printed above: save them as %s and %s", err, certPath, caPath)
			}
		}
		done = true
		if *fs.json {
			return printJSON(env.Stdout, res)
		}
		verb := "issued"
		if *renew {
			verb = "renewed"
		}
		fmt.Fprintf(env.Stdout, "%s %s %s until %s: %s, %s, %s\n", role, name, verb, fmtTime(res.NotAfter), keyPath, certPath, caPath)
		if role == string(store.RoleOperator) {
			// Browsers import a PKCS #12 bundle; openssl makes one
			// without another dependency here.
			fmt.Fprintf(env.Stdout, "for a browser: openssl pkcs12 -export -inkey %s -in %s -certfile %s -name %s -out %s\n",
				keyPath, certPath, caPath, name, filepath.Join(*out, name+".p12"))
		}
		return nil
	}
}

// dashboardCmd prints the loopback dashboard's login page and a one-time
// code for it: whoever may use the admin socket may use the dashboard. The
// code is to be entered in the page, not put in a URL, where a browser's
// command line would show it to every local user.
func dashboardCmd(ctx context.Context, args []string, env Env) error {
	fs := newFlags("dashboard", env)
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	link, err := fs.client().DashboardLogin(ctx)
	if apiErr := (*admin.APIError)(nil); errors.As(err, &apiErr) {
		// The server's message says it all; "(not_found)" after it
		// only puzzled.
		return errors.New(apiErr.Message)
	}
	if err != nil {
		return err
	}
	if *fs.json {
		return printJSON(env.Stdout, link)
	}
	fmt.Fprintf(env.Stdout, "open %s and enter the code %s\n", link.URL, link.Code)
	fmt.Fprintf(env.Stderr, "the code works once, within 5 minutes; the browser stays logged in for %d hours (for this Unix user's programs only) or until fleetmq restarts\n", int(ui.LoginTTL.Hours()))
	return nil
}

func caShow(ctx context.Context, args []string, env Env) error {
	fs := newFlags("ca show", env)
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	ca, err := fs.client().CA(ctx)
	if err != nil {
		return err
	}
	if *fs.json {
		return printJSON(env.Stdout, ca)
	}
	rows := [][]string{
		{"subject", ca.Subject}, {"sha256", ca.Fingerprint},
		{"not before", fmtTime(ca.NotBefore)}, {"not after", fmtTime(ca.NotAfter)},
	}
	// A server from before chain_not_after leaves it zero.
	if !ca.ChainNotAfter.IsZero() && ca.ChainNotAfter.Before(ca.NotAfter) {
		rows = append(rows, []string{"chain ends", fmtTime(ca.ChainNotAfter) + " (an issuer above the CA ends first: renew the CA by then)"})
	}
	return table(env.Stdout, "FIELD\tVALUE", rows)
}

func auditCmd(ctx context.Context, args []string, env Env) error {
	fs := newFlags("audit", env)
	device := fs.String("device", "", "only events of this device")
	since := fs.String("since", "", sinceHelp("events", "24h"))
	limit := fs.Int("limit", 100, "newest N events (1–100000)")
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	if *limit < 1 || *limit > 100_000 {
		return usagef("--limit must be between 1 and 100000")
	}
	evs, err := fs.client().Audit(ctx, *device, *since, *limit)
	if err != nil {
		return err
	}
	if *fs.json {
		return printJSON(env.Stdout, evs)
	}
	rows := make([][]string, len(evs))
	for i, e := range evs {
		rows[i] = []string{fmtTime(e.Time), e.Action, orDash(e.DeviceID), orDash(e.Serial), orDash(e.TokenID), orDash(e.Remote), orDash(e.Detail)}
	}
	return table(env.Stdout, "TIME\tACTION\tDEVICE\tSERIAL\tTOKEN\tREMOTE\tDETAIL", rows)
}

func sinceHelp(what, example string) string {
	return fmt.Sprintf("only %s newer than this: a duration (e.g. %s), a time as the tables print it (quoted: '2026-12-07 20:26:32 UTC') or an RFC 3339 time", what, example)
}

// recordLine is a message as a line for a terminal: time, topic and
// payload, the binary ones in base64.
func recordLine(r admin.TelemetryRecord) string {
	payload := string(r.Payload)
	// A pointer, since JSON null leaves a string untouched: a payload
	// "null" was printed as if it were empty.
	var text *string
	switch {
	case r.PayloadBase64 != nil:
		payload = fmt.Sprintf("(%d bytes, binary) base64:%s", len(r.PayloadBase64), base64.StdEncoding.EncodeToString(r.PayloadBase64))
	case json.Unmarshal(r.Payload, &text) == nil && text != nil:
		payload = *text
	}
	// The topic and payload are the device's words.
	return fmt.Sprintf("%s  %s  %s", r.Received.UTC().Format("2006-01-02 15:04:05.000 UTC"), terminalSafe(r.Topic), terminalSafe(payload))
}

func telemetryCmd(ctx context.Context, args []string, env Env) error {
	fs := newFlags("telemetry", env)
	since := fs.String("since", "", sinceHelp("messages", "1h"))
	limit := fs.Int("limit", 100, "newest N messages (1–100000)")
	follow := fs.Bool("follow", false, "keep streaming new messages")
	if err := fs.parse(args, 1); err != nil {
		return err
	}
	if *limit < 1 || *limit > 100_000 {
		return usagef("--limit must be between 1 and 100000")
	}
	n := 0
	err := fs.client().Telemetry(ctx, fs.Arg(0), *since, *limit, *follow, func(r admin.TelemetryRecord) error {
		n++
		if *fs.json {
			b, err := json.Marshal(r)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(env.Stdout, "%s\n", b)
			return err
		}
		_, err := fmt.Fprintln(env.Stdout, recordLine(r))
		return err
	})
	if err == nil && n == 0 && !*follow {
		// On stderr: stdout stays empty for scripts (and valid for --json).
		window := "stored"
		if *since != "" {
			window = "since " + *since
		}
		fmt.Fprintf(env.Stderr, "no telemetry from %s %s\n", fs.Arg(0), window)
	}
	return err
}
