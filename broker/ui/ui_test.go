package ui_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/ui"
	"github.com/fleetmq/fleetmq/store"
)

func TestPagesRender(t *testing.T) {
	f := newFleet()
	now := time.Now()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice, Serial: "c0ffee", NotAfter: now.Add(30 * 24 * time.Hour), Labels: map[string]string{"site": "lab"}})
	f.certs["c0ffee"] = store.Cert{Serial: "c0ffee", DeviceID: "pi-1", IssuedAt: now, NotAfter: now.Add(30 * 24 * time.Hour)}
	f.certs["bad1"] = store.Cert{Serial: "bad1", DeviceID: "pi-1", IssuedAt: now.Add(-time.Hour), NotAfter: now.Add(29 * 24 * time.Hour), RevokedAt: now}
	f.addDevice(store.Device{ID: "pi-2", Role: store.RoleDevice, NotAfter: now.Add(2 * 24 * time.Hour)})
	f.addDevice(store.Device{ID: "pi-3", Role: store.RoleDevice, NotAfter: now.Add(time.Hour), RevokedAt: now})
	f.addDevice(store.Device{ID: "svc", Role: store.RoleService, NotAfter: now.Add(time.Hour)})
	f.addDevice(store.Device{ID: "svc-old", Role: store.RoleService, NotAfter: now.Add(time.Hour), RevokedAt: now})
	f.setOnline("pi-1", true)
	// pi-2's newest message has no agent_version: the one before tells.
	f.telemetry["pi-2"] = []store.Message{
		{DeviceID: "pi-2", Received: now.Add(-time.Minute), Payload: []byte(`{"agent_version": "2.0.7"}`)},
		{DeviceID: "pi-2", Topic: "devices/pi-2/telemetry/door", Received: now, Payload: []byte(`{"open": true}`)},
	}
	f.telemetry["pi-1"] = []store.Message{
		{DeviceID: "pi-1", Received: now.Add(-time.Minute), Payload: []byte(`{"cpu_temp_c": 40.5, "agent_version": "0.9.0"}`)},
		{DeviceID: "pi-1", Received: now, Payload: []byte(`{"cpu_temp_c": 41, "load1": 0.25, "agent_version": "1.2.3"}`)},
	}
	f.audit = []store.AuditEvent{{Seq: 1, Time: now, Action: store.ActCertIssue, DeviceID: "pi-1"}}
	f.tokens = []store.Token{
		{ID: "abc123", DeviceID: "pi-9", MaxUses: 1, ExpiresAt: now.Add(time.Hour)},
		{ID: "def456", DeviceID: "pi-1", MaxUses: 1, ExpiresAt: now.Add(time.Hour)}, // pi-1 enrolled since
	}
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)

	for _, tc := range []struct {
		path string
		want []string
	}{
		{"/", []string{`id="count-online">1<`, `id="count-offline">1<`, `id="count-expiring">1<`, `id="count-revoked">1<`, "1 service(s)", "pi-2"}},
		{"/devices", []string{"pi-1", "pi-2", "pi-3", "svc", "1.2.3", "2.0.7", "site=lab"}},
		{"/devices?q=lab", []string{"1 of 5 identities match", "pi-1"}},
		{"/devices?state=revoked", []string{"2 of 5", "pi-3"}},
		{"/devices/pi-2", []string{"2.0.7"}},
		{"/devices/pi-1", []string{"1.2.3", `data-field="cpu_temp_c"`, `data-field="load1"`, "cert.issue", `href="/devices/pi-1/revoke"`,
			`<td class="mono">c0ffee</td>`, `>current</td>`, `<td class="mono">bad1</td>`, `<td class="bad">revoked `}},
		{"/devices/pi-3", []string{"revoked"}},
		{"/tokens", []string{"abc123", "pi-9", `href="/tokens/abc123/revoke"`, "2 of 2 tokens match"}},
		{"/tokens?state=unusable", []string{"1 of 2 tokens match", "def456", "pi-1 exists; only a re-provisioning token"}},
		{"/tokens?q=pi-9", []string{"1 of 2 tokens match", "abc123"}},
		{"/audit", []string{"cert.issue"}},
	} {
		r := do(t, c, "GET", ts.URL+tc.path, nil, nil)
		if r.status != 200 {
			t.Errorf("GET %s: %d\n%s", tc.path, r.status, r.body)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(r.body, w) {
				t.Errorf("GET %s: no %q in page", tc.path, w)
			}
		}
		if cc := r.header.Get("Cache-Control"); cc != "no-store" {
			t.Errorf("GET %s: Cache-Control %q", tc.path, cc)
		}
		if csp := r.header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") {
			t.Errorf("GET %s: CSP %q", tc.path, csp)
		}
	}
	if r := do(t, c, "GET", ts.URL+"/devices/pi-3", nil, nil); strings.Contains(r.body, `href="/devices/pi-3/revoke"`) {
		t.Error("a revoked device offers revocation")
	}
	if r := do(t, c, "GET", ts.URL+"/devices/nope", nil, nil); r.status != 404 {
		t.Errorf("unknown device: %d", r.status)
	}
	if r := do(t, c, "GET", ts.URL+"/static/app.js", nil, nil); r.status != 200 || !strings.Contains(r.body, "EventSource") {
		t.Errorf("app.js: %d", r.status)
	}

	// The plotted series are the numeric fields of the stored messages.
	r := do(t, c, "GET", ts.URL+"/devices/pi-1", nil, nil)
	i := strings.Index(r.body, `data-series="`)
	if i < 0 {
		t.Fatal("no data-series")
	}
	raw := r.body[i+len(`data-series="`):]
	raw = raw[:strings.IndexByte(raw, '"')]
	var series []struct {
		Name   string
		Points [][2]float64
	}
	if err := json.Unmarshal([]byte(htmlUnescape(raw)), &series); err != nil {
		t.Fatalf("data-series %q: %v", raw, err)
	}
	if len(series) != 2 || series[0].Name != "cpu_temp_c" || len(series[0].Points) != 2 || series[0].Points[1][1] != 41 ||
		series[1].Name != "load1" || len(series[1].Points) != 1 {
		t.Fatalf("series %+v", series)
	}

	var sum map[string]int
	r = do(t, c, "GET", ts.URL+"/api/overview", nil, nil)
	if err := json.Unmarshal([]byte(r.body), &sum); err != nil || sum["online"] != 1 || sum["revoked"] != 1 || sum["services"] != 1 {
		t.Fatalf("/api/overview: %v %s", err, r.body)
	}
}

// A production line mints tens of thousands of tokens: the page shows the
// newest MaxRows of those that match, and says so.
func TestTokensPageIsBounded(t *testing.T) {
	f := newFleet()
	now := time.Now()
	for i := range 5 {
		f.tokens = append(f.tokens, store.Token{ID: fmt.Sprintf("tok%d", i), DeviceID: fmt.Sprintf("pi-%d", i),
			MaxUses: 1, CreatedAt: now.Add(time.Duration(i) * time.Minute), ExpiresAt: now.Add(time.Hour)})
	}
	s, ts := newUI(t, f, func(c *ui.Config) { c.MaxRows = 2 })
	r := do(t, loggedIn(t, s, ts.URL), "GET", ts.URL+"/tokens", nil, nil)
	if r.status != 200 || !strings.Contains(r.body, "5 of 5 tokens match; the newest 2 are shown") {
		t.Fatalf("GET /tokens: %d\n%s", r.status, r.body)
	}
	for i := range 5 {
		if shown := strings.Contains(r.body, fmt.Sprintf(">tok%d<", i)); shown != (i >= 3) {
			t.Errorf("tok%d shown: %v", i, shown)
		}
	}
}

// TestRevokeSelectionIsBounded: a selection to revoke holds at most what
// one Devices page lists; more is refused with a page that says so, at
// the confirmation and at the revocation, and nothing is revoked.
func TestRevokeSelectionIsBounded(t *testing.T) {
	f := newFleet()
	var ids []string
	for i := range 3 {
		id := fmt.Sprintf("pi-%d", i)
		f.addDevice(store.Device{ID: id, Role: store.RoleDevice, NotAfter: time.Now().Add(time.Hour)})
		ids = append(ids, id)
	}
	s, ts := newUI(t, f, func(c *ui.Config) { c.MaxRows = 2 })
	c := loggedIn(t, s, ts.URL)
	tok := formToken(t, do(t, c, "GET", ts.URL+"/devices", nil, nil).body)
	for _, confirm := range []string{"", "yes"} {
		r := do(t, c, "POST", ts.URL+"/devices/revoke", url.Values{"csrf": {tok}, "confirm": {confirm}, "id": ids}, nil)
		if r.status != http.StatusBadRequest || !strings.Contains(r.body, "3 identities were selected; at most 2 can be revoked at a time, so nothing was revoked") {
			t.Errorf("3 selected, confirm %q: %d\n%s", confirm, r.status, r.body)
		}
	}
	// A repeated id counts once.
	r := do(t, c, "POST", ts.URL+"/devices/revoke", url.Values{"csrf": {tok}, "id": {"pi-0", "pi-1", "pi-0"}}, nil)
	if r.status != 200 || !strings.Contains(r.body, "Revoke 2 identities?") {
		t.Errorf("pi-0 twice and pi-1: %d\n%s", r.status, r.body)
	}
	if revoked, _ := f.changes(); len(revoked) != 0 {
		t.Fatalf("revoked %q", revoked)
	}
}

// otherChar returns a token character that is not c.
func otherChar(c byte) string {
	if c == 'A' {
		return "B"
	}
	return "A"
}

func htmlUnescape(s string) string {
	return strings.NewReplacer("&#34;", `"`, "&quot;", `"`, "&amp;", "&", "&lt;", "<", "&gt;", ">", "&#39;", "'").Replace(s)
}

func TestLoopbackHostOnly(t *testing.T) {
	f := newFleet()
	s, ts := newUI(t, f, nil)
	port := ts.URL[strings.LastIndexByte(ts.URL, ':')+1:]
	for host, want := range map[string]int{
		"127.0.0.1:" + port:      200,
		"localhost:" + port:      200,
		"LOCALHOST":              200,
		"[::1]:" + port:          200,
		"127.3.4.5":              200,
		"evil.example:" + port:   403,
		"evil.example":           403,
		"192.168.1.10:" + port:   403,
		"localhost.evil.example": 403,
	} {
		// Cookies are per host name: the browser logs in under each.
		c := browser(t)
		hdr := map[string]string{"Host": host}
		if r, wantLogin := login(t, s, c, ts.URL, hdr), map[int]int{200: 303, 403: 403}[want]; r.status != wantLogin {
			t.Errorf("Host %q: login %d, want %d", host, r.status, wantLogin)
		}
		if r := do(t, c, "GET", ts.URL+"/", nil, hdr); r.status != want {
			t.Errorf("Host %q: GET /: %d, want %d", host, r.status, want)
		}
	}
}

func TestStateChangesNeedCSRFToken(t *testing.T) {
	f := newFleet()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice, NotAfter: time.Now().Add(time.Hour)})
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)
	page := do(t, c, "GET", ts.URL+"/devices/pi-1/revoke", nil, nil)
	if page.status != 200 || !strings.Contains(page.body, "Revoke pi-1?") {
		t.Fatalf("confirmation page: %d %s", page.status, page.body)
	}
	tok := formToken(t, page.body)
	// The browser session starts with the first form, the login's.
	ck := do(t, browser(t), "GET", ts.URL+"/login", nil, nil).header.Get("Set-Cookie")
	if !strings.Contains(ck, "fleetmq_session=") || !strings.Contains(ck, "HttpOnly") || !strings.Contains(ck, "SameSite=Strict") {
		t.Errorf("session cookie %q", ck)
	}
	// A browser logged in, without the session cookie.
	base, _ := url.Parse(ts.URL)
	noSession := browser(t)
	for _, k := range c.Jar.Cookies(base) {
		if k.Name == "fleetmq_login" {
			noSession.Jar.SetCookies(base, []*http.Cookie{k})
		}
	}
	other := loggedIn(t, s, ts.URL)
	otherTok := formToken(t, do(t, other, "GET", ts.URL+"/devices/pi-1/revoke", nil, nil).body)
	u := ts.URL + "/devices/pi-1/revoke"

	// A form over the size limit is said to be too large, not taken for
	// a forged one (reloading would not help).
	big := url.Values{"csrf": {tok}, "confirm": {"yes"}, "labels": {strings.Repeat("x", 70<<10)}}
	if r := do(t, c, "POST", ts.URL+"/tokens", big, nil); r.status != http.StatusRequestEntityTooLarge || !strings.Contains(r.body, "too large") {
		t.Errorf("a 70 KiB form: %d, want 413", r.status)
	}

	for _, tc := range []struct {
		name   string
		c      *http.Client
		form   url.Values
		hdr    map[string]string
		status int
	}{
		{"no token", c, url.Values{"confirm": {"yes"}}, nil, 403},
		{"wrong token", c, url.Values{"confirm": {"yes"}, "csrf": {otherChar(tok[0]) + tok[1:]}}, nil, 403},
		{"another session's token", c, url.Values{"confirm": {"yes"}, "csrf": {otherTok}}, nil, 403},
		{"no session cookie", noSession, url.Values{"confirm": {"yes"}, "csrf": {tok}}, nil, 403},
		{"cross-origin", c, url.Values{"confirm": {"yes"}, "csrf": {tok}}, map[string]string{"Origin": "http://evil.example"}, 403},
		{"cross-site fetch", c, url.Values{"confirm": {"yes"}, "csrf": {tok}}, map[string]string{"Sec-Fetch-Site": "cross-site"}, 403},
		{"unconfirmed", c, url.Values{"csrf": {tok}}, nil, 400},
	} {
		r := do(t, tc.c, "POST", u, tc.form, tc.hdr)
		if r.status != tc.status {
			t.Errorf("%s: %d, want %d: %s", tc.name, r.status, tc.status, r.body)
		}
		if revoked, _ := f.changes(); len(revoked) != 0 {
			t.Fatalf("%s: revoked %v", tc.name, revoked)
		}
	}
	r := do(t, c, "POST", u, url.Values{"confirm": {"yes"}, "csrf": {tok}}, map[string]string{"Origin": strings.TrimSuffix(ts.URL, "/")})
	if r.status != http.StatusSeeOther || r.header.Get("Location") != "/devices/pi-1?flash=revoked" {
		t.Fatalf("revoke: %d %v", r.status, r.header)
	}
	if revoked, _ := f.changes(); !slices.Equal(revoked, []string{"pi-1 by ui:local"}) {
		t.Fatalf("revoked %v", revoked)
	}
	if r := do(t, c, "GET", ts.URL+"/devices/pi-1?flash=revoked", nil, nil); !strings.Contains(r.body, "Device revoked") {
		t.Error("no confirmation after revoking")
	}

	// Tokens: confirmation page, then a POST with the session's token.
	page = do(t, c, "GET", ts.URL+"/tokens/new?count=3&prefix=pi-&uses=2&ttl=7d&labels=site%3Dlab", nil, nil)
	if page.status != 200 || !strings.Contains(page.body, "Create 3 token(s)?") {
		t.Fatalf("token confirmation: %d %s", page.status, page.body)
	}
	form := url.Values{"confirm": {"yes"}, "count": {"3"}, "prefix": {"pi-"}, "uses": {"2"}, "ttl": {"7d"}, "labels": {"site=lab"}}
	if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != 403 {
		t.Fatalf("token creation without CSRF token: %d", r.status)
	}
	form.Set("csrf", formToken(t, page.body))
	if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != http.StatusBadRequest {
		t.Fatalf("token creation without the form's one-time field: %d", r.status)
	}
	form.Set("once", onceField(t, page.body))
	r = do(t, c, "POST", ts.URL+"/tokens", form, nil)
	if r.status != http.StatusCreated || !strings.Contains(r.body, "fmq1.secret-2.x") || !strings.Contains(r.body, "pi-0003") {
		t.Fatalf("token creation: %d %s", r.status, r.body)
	}
	// Reloading the page of secrets posts the form again: nothing more
	// is minted.
	if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != http.StatusConflict || !strings.Contains(r.body, "already submitted") {
		t.Fatalf("the same form again: %d %s", r.status, r.body)
	}
	_, minted := f.changes()
	want := admin.TokenRequest{Count: 3, Prefix: "pi-", Uses: 2, TTL: (7 * 24 * time.Hour).String(), Labels: map[string]string{"site": "lab"}}
	if len(minted) != 1 || minted[0].Count != want.Count || minted[0].Prefix != want.Prefix || minted[0].Uses != want.Uses ||
		minted[0].TTL != want.TTL || minted[0].Labels["site"] != "lab" {
		t.Fatalf("minted %+v, want %+v", minted, want)
	}
	page = do(t, c, "GET", ts.URL+"/tokens/new?count=3&prefix=pi-&uses=2&ttl=7d&labels=site%3Dlab&format=csv", nil, nil)
	form.Set("format", "csv")
	form.Set("once", onceField(t, page.body))
	r = do(t, c, "POST", ts.URL+"/tokens", form, nil)
	if r.status != 200 || !strings.HasPrefix(r.header.Get("Content-Disposition"), "attachment") ||
		!strings.HasPrefix(r.body, "id,token,expires_at\npi-0001,fmq1.secret-0.x,") {
		t.Fatalf("CSV: %d %v %q", r.status, r.header, r.body)
	}

	// A re-provisioning token for one device.
	page = do(t, c, "GET", ts.URL+"/tokens/new?device=pi-7&reprovision=yes&ttl=24h", nil, nil)
	if page.status != 200 || !strings.Contains(page.body, "re-provisioning the existing device pi-7") {
		t.Fatalf("re-provisioning confirmation: %d %s", page.status, page.body)
	}
	form = url.Values{"confirm": {"yes"}, "device": {"pi-7"}, "reprovision": {"yes"}, "ttl": {"24h"}, "csrf": {formToken(t, page.body)}, "once": {onceField(t, page.body)}}
	if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != http.StatusCreated {
		t.Fatalf("re-provisioning token: %d %s", r.status, r.body)
	}
	if _, minted := f.changes(); len(minted) == 0 || minted[len(minted)-1].DeviceID != "pi-7" || !minted[len(minted)-1].Reprovision {
		t.Fatalf("minted %+v, want a re-provisioning token for pi-7", minted)
	}

	page = do(t, c, "GET", ts.URL+"/tokens/abc/revoke", nil, nil)
	if page.status != 404 {
		t.Fatalf("revoking an unknown token: %d", page.status)
	}
	f.mu.Lock()
	f.tokens = []store.Token{{ID: "abc", MaxUses: 1}}
	f.mu.Unlock()
	page = do(t, c, "GET", ts.URL+"/tokens/abc/revoke", nil, nil)
	r = do(t, c, "POST", ts.URL+"/tokens/abc/revoke", url.Values{"confirm": {"yes"}, "csrf": {formToken(t, page.body)}}, nil)
	if r.status != http.StatusSeeOther {
		t.Fatalf("token revoke: %d %s", r.status, r.body)
	}
	if revoked, _ := f.changes(); !slices.Contains(revoked, "token abc by ui:local") {
		t.Fatalf("revoked %v", revoked)
	}

	// Revoking again (another tab, a second operator) is a conflict, not
	// a refusal of the operator, and is not offered again.
	if r := do(t, c, "GET", ts.URL+"/tokens/abc/revoke", nil, nil); r.status != http.StatusConflict {
		t.Errorf("confirming a revoked token's revocation: %d", r.status)
	}
	if r := do(t, c, "POST", ts.URL+"/tokens/abc/revoke", url.Values{"confirm": {"yes"}, "csrf": {tok}}, nil); r.status != http.StatusConflict {
		t.Errorf("revoking a revoked token: %d %s", r.status, r.body)
	}
	if r := do(t, c, "POST", ts.URL+"/devices/pi-1/revoke", url.Values{"confirm": {"yes"}, "csrf": {tok}}, nil); r.status != http.StatusConflict {
		t.Errorf("revoking a revoked device: %d %s", r.status, r.body)
	}
}

// TestTokenFormRefusesBadValues: a value the server would refuse, or
// would read as something else than typed (uses=0 as one use), never gets
// a confirmation page, and a POST of it mints nothing.
func TestTokenFormRefusesBadValues(t *testing.T) {
	f := newFleet()
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)
	tok := formToken(t, do(t, c, "GET", ts.URL+"/tokens/new?ttl=24h", nil, nil).body)
	for _, q := range []string{"ttl=NaNd", "ttl=Infd", "ttl=-1h", "ttl=0d", "ttl=99999999d", "count=-1&prefix=pi-", "count=0&prefix=pi-", "uses=0", "uses=-3", "uses=x",
		"count=2&prefix=pi-&start=0", "count=2&prefix=pi-&start=-5", "count=2&prefix=pi-&start=x", "device=pi-1&start=7"} {
		if r := do(t, c, "GET", ts.URL+"/tokens/new?"+q, nil, nil); r.status != http.StatusBadRequest {
			t.Errorf("GET /tokens/new?%s: %d, want 400", q, r.status)
		}
		form, err := url.ParseQuery(q)
		if err != nil {
			t.Fatal(err)
		}
		form.Set("confirm", "yes")
		form.Set("csrf", tok)
		if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != http.StatusBadRequest {
			t.Errorf("POST /tokens %s: %d, want 400: %s", q, r.status, r.body)
		}
	}
	if _, minted := f.changes(); len(minted) != 0 {
		t.Fatalf("minted %+v", minted)
	}
}

func TestOperatorCertificateRequired(t *testing.T) {
	f := newFleet()
	p := newPKI(t)
	op := p.issue(t, f, "ops", store.RoleOperator)
	dev := p.issue(t, f, "pi-1", store.RoleDevice)
	svc := p.issue(t, f, "svc", store.RoleService)
	gone := p.issue(t, f, "ops-gone", store.RoleOperator)
	f.mu.Lock()
	d := f.devices["ops-gone"]
	d.RevokedAt = time.Now()
	f.devices["ops-gone"] = d
	f.mu.Unlock()
	oldCert := p.issue(t, f, "ops-old", store.RoleOperator)
	f.mu.Lock()
	c := f.certs[enrollSerial(oldCert)]
	c.RevokedAt = time.Now()
	f.certs[enrollSerial(oldCert)] = c
	f.mu.Unlock()
	stranger := newPKI(t).issue(t, newFleet(), "ops", store.RoleOperator) // same name, unknown serial

	s, err := ui.New(ui.Config{Store: f, Admin: f, Online: f.Online})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	for _, tc := range []struct {
		name   string
		leaf   *x509.Certificate
		status int
	}{
		{"operator", op, 200},
		{"no certificate", nil, 403},
		{"device", dev, 403},
		{"service", svc, 403},
		{"revoked operator", gone, 403},
		{"revoked certificate", oldCert, 403},
		{"unknown serial", stranger, 403},
	} {
		req := httptest.NewRequest("GET", "https://fleet.example/", nil)
		req.TLS = &tls.ConnectionState{}
		if tc.leaf != nil {
			req.TLS.PeerCertificates = []*x509.Certificate{tc.leaf}
			req.TLS.VerifiedChains = [][]*x509.Certificate{{tc.leaf}}
		}
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, req)
		if rec.Code != tc.status {
			t.Errorf("%s: %d, want %d: %s", tc.name, rec.Code, tc.status, rec.Body)
		}
		if tc.status == 200 && !strings.Contains(rec.Body.String(), "operator <b>ops</b>") {
			t.Errorf("%s: the page does not name the operator", tc.name)
		}
		if ck := rec.Header().Get("Set-Cookie"); tc.status == 200 && !strings.HasPrefix(ck, "__Host-") {
			t.Errorf("%s: session cookie %q lacks the __Host- prefix", tc.name, ck)
		}
	}
}

// An operator's live stream ends when the certificate it was opened with
// expires: the dashboard checks certificates per request, and a stream is
// one request that lasts.
func TestOperatorStreamEndsAtCertificateExpiry(t *testing.T) {
	f := newFleet()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice})
	op := newPKI(t).issue(t, f, "ops", store.RoleOperator)
	s, err := ui.New(ui.Config{Store: f, Admin: f, Online: f.Online, Follow: f.Follow,
		Now: func() time.Time { return op.NotAfter.Add(-300 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	// TLS itself is the server package's (TestDashboardOnNetworkNeedsOperator); here
	// the handler sees the state a verified handshake leaves.
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{op}, VerifiedChains: [][]*x509.Certificate{{op}}}
		s.Handler().ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	streamEnds(t, http.DefaultClient, ts.URL+"/events?device=pi-1", "after the operator's certificate expired")
}

// TestStrictTransportSecurityOnlyOverHTTPS: the HTTPS dashboard tells
// browsers to come back over HTTPS only, on every answer, refusals
// included; the loopback one, plain HTTP, does not, as a browser would
// ignore it there (RFC 6797 section 8.1).
func TestStrictTransportSecurityOnlyOverHTTPS(t *testing.T) {
	f := newFleet()
	p := newPKI(t)
	op := p.issueTLS(t, f, "ops", store.RoleOperator)
	dev := p.issueTLS(t, f, "pi-1", store.RoleDevice)
	s, err := ui.New(ui.Config{Store: f, Admin: f, Online: f.Online})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	// The handshake as Listen configures it for a network address, on
	// 127.0.0.1: a test binds nothing else.
	serverCert, err := p.ca.IssueServer([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(s.Handler())
	ts.TLS = &tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: p.ca.Pool()}
	ts.StartTLS()
	t.Cleanup(ts.Close)
	client := func(cert *tls.Certificate) *http.Client {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: p.ca.Pool(), Certificates: []tls.Certificate{*cert}}}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 10 * time.Second}
	}
	_, plain := newUI(t, newFleet(), nil)
	for _, tc := range []struct {
		name   string
		c      *http.Client
		url    string
		status int
		hsts   bool
	}{
		{"HTTPS, operator", client(op), ts.URL + "/", 200, true},
		{"HTTPS, unknown page", client(op), ts.URL + "/nothing", 404, true},
		{"HTTPS, device certificate", client(dev), ts.URL + "/", 403, true},
		{"loopback HTTP, login page", http.DefaultClient, plain.URL + "/login", 200, false},
		{"loopback HTTP, not logged in", http.DefaultClient, plain.URL + "/api/overview", 401, false},
	} {
		r := do(t, tc.c, "GET", tc.url, nil, nil)
		if r.status != tc.status {
			t.Errorf("%s: %d, want %d", tc.name, r.status, tc.status)
		}
		want := []string(nil)
		if tc.hsts {
			want = []string{"max-age=31536000"}
		}
		if got := r.header.Values("Strict-Transport-Security"); !slices.Equal(got, want) {
			t.Errorf("%s: Strict-Transport-Security %q, want %q", tc.name, got, want)
		}
	}
}

func enrollSerial(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

func TestListenRefusesNonLoopbackWithoutOperatorAuth(t *testing.T) {
	f := newFleet()
	s, err := ui.New(ui.Config{Addr: "0.0.0.0:0", Store: f, Admin: f, Online: f.Online})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Listen(); !errors.Is(err, ui.ErrInsecureAddr) {
		t.Fatalf("Listen on 0.0.0.0 without client certificates: %v, want ErrInsecureAddr", err)
	}
	if _, err := ui.New(ui.Config{Store: f, Admin: f, Online: f.Online, GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return nil, nil }}); err == nil {
		t.Fatal("GetCertificate without ClientCAs accepted")
	}

	s, err = ui.New(ui.Config{Addr: "127.0.0.1:0", Store: f, Admin: f, Online: f.Online})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	if s.Secure() || !strings.HasPrefix(s.URL(), "http://127.0.0.1:") {
		t.Fatalf("loopback: secure %v, URL %s", s.Secure(), s.URL())
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	loginURL, _, err := s.Login()
	if err != nil || loginURL != s.URL()+"login" {
		t.Fatalf("Login: %q %v", loginURL, err)
	}
	c := loggedIn(t, s, strings.TrimSuffix(s.URL(), "/"))
	resp, err := c.Get(s.URL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d", s.URL(), resp.StatusCode)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

func TestEventStream(t *testing.T) {
	f := newFleet()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice})
	s, ts := newUI(t, f, nil)
	resp, err := loggedIn(t, s, ts.URL).Get(ts.URL + "/events?device=pi-1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("Content-Type %q", resp.Header.Get("Content-Type"))
	}
	ev := &sseReader{r: bufio.NewReader(resp.Body)}
	// The stream answers once the subscriptions are in place, with the
	// identities online then.
	if name, data := ev.next(t); name != "online" || data != `[]` {
		t.Fatalf("first event %s %s, want online []", name, data)
	}
	f.setOnline("pi-1", true)
	name, data := ev.next(t)
	if name != "presence" || data != `{"id":"pi-1","online":true}` {
		t.Fatalf("event %s %s", name, data)
	}
	ch := f.followers("pi-1")
	if ch == nil {
		t.Fatal("the stream does not follow pi-1")
	}
	at := time.UnixMilli(1_700_000_000_000)
	ch <- store.Message{DeviceID: "pi-1", Received: at, Payload: []byte(`not json`)}
	ch <- store.Message{DeviceID: "pi-1", Received: at, Payload: []byte(`{"cpu_temp_c": 50.5, "agent_version": "1"}`)}
	name, data = ev.next(t)
	if name != "telemetry" || data != `{"t":1700000000000,"values":{"cpu_temp_c":50.5}}` {
		t.Fatalf("event %s %s", name, data)
	}
	f.setOnline("pi-1", false)
	if name, data = ev.next(t); name != "presence" || data != `{"id":"pi-1","online":false}` {
		t.Fatalf("event %s %s", name, data)
	}
	// Close ends the stream.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ev.r.ReadString('\n'); err == nil {
		// A heartbeat may be in flight; the stream must end right after.
		if _, err := ev.r.ReadString('\n'); err == nil {
			t.Fatal("stream still open after Close")
		}
	}
}

// A page is rendered before its event stream opens, and a stream that falls
// behind is closed and opened again by the browser: changes in between
// send no event to that page. Every stream starts with the identities
// online then, from which its events follow on.
func TestEventStreamStartsWithOnlineSet(t *testing.T) {
	f := newFleet()
	for _, id := range []string{"pi-1", "pi-2", "pi-3"} {
		f.addDevice(store.Device{ID: id, Role: store.RoleDevice})
	}
	f.setOnline("pi-3", true)
	f.setOnline("pi-1", true)
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)
	open := func() (*sseReader, func()) {
		t.Helper()
		resp, err := c.Get(ts.URL + "/events")
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("event stream: %v %v", resp, err)
		}
		return &sseReader{r: bufio.NewReader(resp.Body)}, func() { resp.Body.Close() }
	}
	first, closeFirst := open()
	defer closeFirst()
	if name, data := first.next(t); name != "online" || data != `["pi-1","pi-3"]` {
		t.Fatalf("first event %s %s, want online [pi-1 pi-3]", name, data)
	}
	// A change while the first stream is open: a second stream starts
	// from the new set, not from what the first was told.
	f.setOnline("pi-1", false)
	if name, data := first.next(t); name != "presence" || data != `{"id":"pi-1","online":false}` {
		t.Fatalf("event %s %s", name, data)
	}
	second, closeSecond := open()
	defer closeSecond()
	if name, data := second.next(t); name != "online" || data != `["pi-3"]` {
		t.Fatalf("second stream's first event %s %s, want online [pi-3]", name, data)
	}
	f.setOnline("pi-2", true)
	for _, ev := range []*sseReader{first, second} {
		if name, data := ev.next(t); name != "presence" || data != `{"id":"pi-2","online":true}` {
			t.Fatalf("event %s %s", name, data)
		}
	}
}

// auditLog is the fleet with the audit log of a real store.
type auditLog struct {
	*fleet
	db *store.DB
}

func (a auditLog) Audit(ctx context.Context, f store.AuditFilter) ([]store.AuditEvent, error) {
	return a.db.Audit(ctx, f)
}

// The store filters the audit log by identity only, so the page reads it
// for an action: a revocation followed by a production line's worth of
// other events is still found, not shown as no event at all.
func TestAuditActionFilterReadsDeeper(t *testing.T) {
	db, err := store.Open(filepath.Join(t.TempDir(), "fleetmq.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	now := time.Now()
	evs := []store.AuditEvent{{Time: now, Action: store.ActDeviceRevoke, DeviceID: "pi-7", Remote: "ui:local"}}
	for i := range 2500 {
		evs = append(evs, store.AuditEvent{Time: now, Action: store.ActTokenCreate, DeviceID: fmt.Sprintf("pi-%04d", i)})
	}
	if err := db.AppendAudit(context.Background(), evs...); err != nil {
		t.Fatal(err)
	}
	f := newFleet()
	s, ts := newUI(t, f, func(c *ui.Config) { c.Store = auditLog{fleet: f, db: db} })
	c := loggedIn(t, s, ts.URL)
	for _, path := range []string{"/audit?action=device.revoke", "/audit?action=device.revoke&limit=1"} {
		r := do(t, c, "GET", ts.URL+path, nil, nil)
		if r.status != http.StatusOK || !strings.Contains(r.body, "1 event(s).") || !strings.Contains(r.body, `href="/devices/pi-7"`) {
			t.Errorf("GET %s: %d, the revocation not found:\n%s", path, r.status, r.body)
		}
	}
	// The newest of an action come first, and no more than the limit.
	r := do(t, c, "GET", ts.URL+"/audit?action=token.create&limit=3", nil, nil)
	if !strings.Contains(r.body, "3 event(s).") || !strings.Contains(r.body, "pi-2499") || strings.Contains(r.body, "pi-2496") {
		t.Errorf("token.create, limit 3:\n%s", r.body)
	}
}

// A production line goes on where its last batch ended: ids are for life,
// so a second batch with the same prefix starts after the ids taken, as
// with `fleetmq token create --start`. The form had no such field, and
// every later batch from the dashboard failed with id_taken.
func TestTokenBatchGoesOn(t *testing.T) {
	f := newFleet()
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)
	if r := do(t, c, "GET", ts.URL+"/tokens", nil, nil); !strings.Contains(r.body, `name="start"`) {
		t.Fatalf("the token form has no field for a batch's first number:\n%s", r.body)
	}
	page := do(t, c, "GET", ts.URL+"/tokens/new?count=50&prefix=pi-&start=2001&ttl=24h", nil, nil)
	if page.status != http.StatusOK || !strings.Contains(page.body, "ids pi-2001 … pi-2050 (50)") {
		t.Fatalf("confirmation: %d %s", page.status, page.body)
	}
	form := url.Values{"confirm": {"yes"}, "csrf": {formToken(t, page.body)}, "once": {onceField(t, page.body)}}
	for _, name := range []string{"count", "prefix", "start", "ttl", "format"} {
		form.Set(name, formField(t, page.body, name))
	}
	if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != http.StatusCreated {
		t.Fatalf("token creation: %d %s", r.status, r.body)
	}
	if _, minted := f.changes(); len(minted) != 1 || minted[0].Count != 50 || minted[0].Prefix != "pi-" || minted[0].Start != 2001 {
		t.Fatalf("minted %+v, want 50 from pi-2001", minted)
	}
}

// A form for an id that already has a usable token is refused with 409
// and what to do here (the admin API's message gives CLI advice): the
// token's revoke button, and the same form again with replace ticked,
// which the form may then be sent with.
func TestTokenFormRefusedForALiveToken(t *testing.T) {
	f := newFleet()
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)
	page := do(t, c, "GET", ts.URL+"/tokens/new?device=pi-live&ttl=24h", nil, nil)
	form := url.Values{"confirm": {"yes"}, "csrf": {formToken(t, page.body)}, "once": {onceField(t, page.body)}}
	for _, name := range []string{"device", "ttl", "format"} {
		form.Set(name, formField(t, page.body, name))
	}
	r := do(t, c, "POST", ts.URL+"/tokens", form, nil)
	if r.status != http.StatusConflict {
		t.Fatalf("token for an id with a usable token: %d %s", r.status, r.body)
	}
	body := htmlUnescape(r.body)
	for _, want := range []string{"pi-live already has a usable token", "“replace” ticked", `href="/tokens/live01/revoke"`,
		`href="/tokens/new?device=pi-live&format=html&labels=&prefix=&replace=yes&ttl=24h"`} {
		if !strings.Contains(body, want) {
			t.Errorf("refusal page lacks %q:\n%s", want, body)
		}
	}
	if strings.Contains(body, "fleetmq token") {
		t.Errorf("refusal page gives CLI advice:\n%s", body)
	}
	page = do(t, c, "GET", ts.URL+"/tokens/new?device=pi-live&replace=yes&ttl=24h", nil, nil)
	if !strings.Contains(page.body, "Replaces") || formField(t, page.body, "replace") != "yes" {
		t.Fatalf("confirmation with replace:\n%s", page.body)
	}
	// Nothing was minted: the refused form's one-time field is good again.
	form.Set("replace", "yes")
	if r := do(t, c, "POST", ts.URL+"/tokens", form, nil); r.status != http.StatusCreated {
		t.Fatalf("the same form with replace: %d %s", r.status, r.body)
	}
	if _, minted := f.changes(); len(minted) != 1 || minted[0].DeviceID != "pi-live" || !minted[0].Replace {
		t.Fatalf("minted %+v, want one token replacing pi-live's", minted)
	}
}
