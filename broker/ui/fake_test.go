package ui_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/ui"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// fleet is an in-memory Store and Admin that records the changes asked of it.
type fleet struct {
	mu        sync.Mutex
	devices   map[string]store.Device
	certs     map[string]store.Cert
	online    map[string]bool
	tokens    []store.Token
	audit     []store.AuditEvent
	telemetry map[string][]store.Message
	follow    map[string]chan store.Message

	revoked []string // "id by remote"
	minted  []admin.TokenRequest
}

func newFleet() *fleet {
	return &fleet{
		devices: map[string]store.Device{}, certs: map[string]store.Cert{}, online: map[string]bool{},
		telemetry: map[string][]store.Message{}, follow: map[string]chan store.Message{},
	}
}

func (f *fleet) addDevice(d store.Device) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devices[d.ID] = d
}

func (f *fleet) setOnline(id string, on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.online[id] = on
}

func (f *fleet) changes() (revoked []string, minted []admin.TokenRequest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.revoked), slices.Clone(f.minted)
}

func (f *fleet) Online() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id, on := range f.online {
		if on {
			ids = append(ids, id)
		}
	}
	return ids
}

func (f *fleet) Follow(id string) (<-chan store.Message, func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan store.Message, 16)
	f.follow[id] = ch
	return ch, func() {}
}

func (f *fleet) followers(id string) chan store.Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.follow[id]
}

func (f *fleet) Device(_ context.Context, id string) (store.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.devices[id]
	if !ok {
		return store.Device{}, fmt.Errorf("device %s: %w", id, store.ErrNotFound)
	}
	return d, nil
}

func (f *fleet) Cert(_ context.Context, serial string) (store.Cert, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.certs[serial]
	if !ok {
		return store.Cert{}, fmt.Errorf("cert %s: %w", serial, store.ErrCertUnknown)
	}
	return c, nil
}

func (f *fleet) Tokens(context.Context) ([]store.Token, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.tokens), nil
}

func (f *fleet) TokenInfos(context.Context) ([]admin.TokenInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return admin.TokenInfos(f.tokens, func(id string) (store.Device, bool) { d, ok := f.devices[id]; return d, ok }, time.Now()), nil
}

func (f *fleet) Audit(_ context.Context, flt store.AuditFilter) ([]store.AuditEvent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []store.AuditEvent
	for _, e := range f.audit {
		if flt.DeviceID == "" || e.DeviceID == flt.DeviceID {
			out = append(out, e)
		}
	}
	return out, nil
}

func (f *fleet) Telemetry(_ context.Context, id string, _ time.Time, limit int) ([]store.Message, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	msgs := f.telemetry[id]
	if limit > 0 && len(msgs) > limit {
		msgs = msgs[len(msgs)-limit:]
	}
	return slices.Clone(msgs), nil
}

func (f *fleet) info(d store.Device) admin.DeviceInfo {
	return admin.DeviceInfo{Device: d, Online: f.online[d.ID]}
}

func (f *fleet) DeviceInfos(context.Context) ([]admin.DeviceInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []admin.DeviceInfo
	for _, d := range f.devices {
		out = append(out, f.info(d))
	}
	slices.SortFunc(out, func(a, b admin.DeviceInfo) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

func (f *fleet) DeviceInfo(ctx context.Context, id string) (admin.DeviceInfo, error) {
	d, err := f.Device(ctx, id)
	if err != nil {
		return admin.DeviceInfo{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	info := f.info(d)
	for _, c := range f.certs {
		if c.DeviceID == id {
			info.Certificates = append(info.Certificates, c)
		}
	}
	slices.SortFunc(info.Certificates, func(a, b store.Cert) int { return b.IssuedAt.Compare(a.IssuedAt) })
	return info, nil
}

// CheckTokens checks nothing: the real checks are admin's, tested with the
// real handler in broker/server.
func (f *fleet) CheckTokens(admin.TokenRequest) error { return nil }

func (f *fleet) MintTokens(_ context.Context, req admin.TokenRequest, remote string) ([]admin.NewToken, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if req.DeviceID == "pi-live" && !req.Replace {
		// As the admin API refuses a second usable token for an id.
		live := &store.LiveTokensError{Tokens: []store.Token{{ID: "live01", DeviceID: "pi-live", MaxUses: 1}}}
		return nil, &enroll.Error{Code: enroll.CodeIDHasToken, Err: live, Message: "pi-live already has a usable token: revoke it first (fleetmq token revoke live01)"}
	}
	f.minted = append(f.minted, req)
	n := max(1, req.Count)
	out := make([]admin.NewToken, n)
	for i := range out {
		id := req.DeviceID
		if req.Count > 0 {
			id = fmt.Sprintf("%s%04d", req.Prefix, i+1)
		}
		out[i] = admin.NewToken{Token: store.Token{ID: fmt.Sprintf("t%d", i), DeviceID: id}, Secret: fmt.Sprintf("fmq1.secret-%d.x", i)}
	}
	return out, nil
}

func (f *fleet) RevokeToken(_ context.Context, id, remote string) (store.Token, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, t := range f.tokens {
		if t.ID == id && !t.RevokedAt.IsZero() {
			return store.Token{}, fmt.Errorf("revoke token %s: %w", id, store.ErrTokenRevoked)
		} else if t.ID == id {
			f.tokens[i].RevokedAt = time.Now()
		}
	}
	f.revoked = append(f.revoked, "token "+id+" by "+remote)
	return store.Token{ID: id}, nil
}

func (f *fleet) RevokeDevice(_ context.Context, id, remote string) (admin.RevokeResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.devices[id]
	if !ok {
		return admin.RevokeResult{}, fmt.Errorf("revoke %s: %w", id, store.ErrNotFound)
	}
	if d.Revoked() {
		return admin.RevokeResult{}, fmt.Errorf("revoke %s: %w", id, store.ErrDeviceRevoked)
	}
	d.RevokedAt = time.Now()
	f.devices[id] = d
	f.revoked = append(f.revoked, id+" by "+remote)
	return admin.RevokeResult{DeviceID: id}, nil
}

// RevokeDevices revokes ids as the admin API does: none when one is
// unknown, already revoked ones reported.
func (f *fleet) RevokeDevices(_ context.Context, ids []string, remote string) ([]admin.RevokeOutcome, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var unknown []string
	for _, id := range ids {
		if _, ok := f.devices[id]; !ok {
			unknown = append(unknown, id)
		}
	}
	if len(unknown) > 0 {
		return nil, &store.UnknownIDsError{IDs: unknown}
	}
	var out []admin.RevokeOutcome
	for _, id := range ids {
		d := f.devices[id]
		if d.Revoked() {
			out = append(out, admin.RevokeOutcome{DeviceID: id, Result: admin.ResultAlreadyRevoked, RevokedAt: d.RevokedAt})
			continue
		}
		d.RevokedAt = time.Now()
		f.devices[id] = d
		f.revoked = append(f.revoked, id+" by "+remote)
		out = append(out, admin.RevokeOutcome{DeviceID: id, Result: admin.ResultRevoked, RevokedAt: d.RevokedAt})
	}
	return out, nil
}

// Command refuses every command: sending one takes a broker, and the
// dashboard's command form is tested against a real server
// (broker/server TestDashboardCommand).
func (f *fleet) Command(_ context.Context, id string, _ admin.CommandRequest, _ string) (admin.CommandResult, error) {
	return admin.CommandResult{}, enroll.Errorf(enroll.CodeDeviceOffline, "%s is not connected", id)
}

// NextFree is 1: the dashboard's offer of the next number is tested
// against a real server (broker/server TestDashboardRefusedBatchOffersNextStart).
func (f *fleet) NextFree(context.Context, string) (int, error) { return 1, nil }

// newUI returns a dashboard over f (not listening) and a test server for
// its handler.
func newUI(tb testing.TB, f *fleet, mutate func(*ui.Config)) (*ui.Server, *httptest.Server) {
	tb.Helper()
	cfg := ui.Config{Store: f, Admin: f, Online: f.Online, Follow: f.Follow, PresenceInterval: 5 * time.Millisecond}
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := ui.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	ts := httptest.NewServer(s.Handler())
	tb.Cleanup(ts.Close)
	return s, ts
}

// browser is an HTTP client with cookies, like a browser, that does not
// follow redirects.
func browser(tb testing.TB) *http.Client {
	tb.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		tb.Fatal(err)
	}
	return &http.Client{Jar: jar, Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
}

// loggedIn is a browser logged in to the loopback dashboard s served at
// base, through its login form and a code from s.
func loggedIn(tb testing.TB, s *ui.Server, base string) *http.Client {
	tb.Helper()
	c := browser(tb)
	if r := login(tb, s, c, base, nil); r.status != http.StatusSeeOther {
		tb.Fatalf("login: %d %s", r.status, r.body)
	}
	return c
}

// login enters a fresh code of s in the login form at base with c, with
// hdr on both requests.
func login(tb testing.TB, s *ui.Server, c *http.Client, base string, hdr map[string]string) reply {
	tb.Helper()
	code, err := ui.LoginCode(s)
	if err != nil {
		tb.Fatal(err)
	}
	page := do(tb, c, "GET", base+"/login", nil, hdr)
	if page.status != http.StatusOK {
		return page
	}
	return do(tb, c, "POST", base+"/login", url.Values{"code": {code}, "csrf": {formToken(tb, page.body)}}, hdr)
}

// streamEnds opens the event stream at u and fails unless the server ends
// it within 10 s.
func streamEnds(tb testing.TB, c *http.Client, u, when string) {
	tb.Helper()
	waitEnd(tb, openStream(tb, c, u), when)
}

// openStream opens the event stream at u, read to its end in the
// background: the channel is closed when the server ends it.
func openStream(tb testing.TB, c *http.Client, u string) <-chan struct{} {
	tb.Helper()
	resp, err := c.Get(u)
	if err != nil || resp.StatusCode != 200 {
		tb.Fatalf("event stream: %v %v", resp, err)
	}
	tb.Cleanup(func() { resp.Body.Close() })
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		io.Copy(io.Discard, resp.Body)
	}()
	return ended
}

// waitEnd fails unless ended is closed within 10 s.
func waitEnd(tb testing.TB, ended <-chan struct{}, when string) {
	tb.Helper()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		tb.Fatalf("the stream is still open 10 s %s", when)
	}
}

type reply struct {
	status int
	header http.Header
	body   string
}

func do(tb testing.TB, c *http.Client, method, u string, form url.Values, hdr map[string]string) reply {
	tb.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		tb.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range hdr {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, resp.Header, string(b)}
}

// formToken returns the CSRF field of a page.
func formToken(tb testing.TB, page string) string {
	tb.Helper()
	return formField(tb, page, "csrf")
}

// onceField returns the one-time field of a token confirmation page.
func onceField(tb testing.TB, page string) string {
	tb.Helper()
	return formField(tb, page, "once")
}

func formField(tb testing.TB, page, name string) string {
	tb.Helper()
	m := regexp.MustCompile(`name="` + name + `" value="([^"]+)"`).FindStringSubmatch(page)
	if m == nil {
		tb.Fatalf("no %s field in page:\n%s", name, page)
	}
	return m[1]
}

// sseReader reads server-sent events.
type sseReader struct {
	r *bufio.Reader
}

// next returns the next event's name and data, skipping comments.
func (s *sseReader) next(tb testing.TB) (string, string) {
	tb.Helper()
	var name, data string
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			tb.Fatalf("event stream: %v", err)
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "":
			if name != "" || data != "" {
				return name, data
			}
		case strings.HasPrefix(line, "event: "):
			name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data = strings.TrimPrefix(line, "data: ")
		}
	}
}

// pki is a fleet CA issuing client certificates, recorded in a fleet.
type pki struct {
	ca *enroll.CA
}

func newPKI(tb testing.TB) *pki {
	tb.Helper()
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: tb.TempDir()})
	if err != nil {
		tb.Fatal(err)
	}
	return &pki{ca: ca}
}

// issue makes a certificate for id with role and records both in f.
func (p *pki) issue(tb testing.TB, f *fleet, id string, role store.Role) *x509.Certificate {
	tb.Helper()
	return p.issueTLS(tb, f, id, role).Leaf
}

// issueTLS is issue, with the key, for a client to present.
func (p *pki) issueTLS(tb testing.TB, f *fleet, id string, role store.Role) *tls.Certificate {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := p.ca.IssueDevice(key.Public(), id, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	serial := enroll.SerialHex(c.SerialNumber)
	f.mu.Lock()
	f.certs[serial] = store.Cert{Serial: serial, DeviceID: id, NotBefore: c.NotBefore, NotAfter: c.NotAfter, DER: c.Raw}
	f.devices[id] = store.Device{ID: id, Role: role, Serial: serial, NotAfter: c.NotAfter}
	f.mu.Unlock()
	return &tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key, Leaf: c}
}
