package ui_test

import (
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/ui"
	"github.com/fleetmq/fleetmq/store"
)

// clock is a settable Config.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) set(t time.Time) { c.mu.Lock(); c.t = t; c.mu.Unlock() }

// The loopback dashboard serves only browsers logged in with a one-time
// code from the admin socket, entered in its login form: any other local
// account or process that can reach 127.0.0.1 gets nothing, not even the
// fleet's pages.
func TestLocalLogin(t *testing.T) {
	f := newFleet()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice})
	clk := &clock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	s, ts := newUI(t, f, func(c *ui.Config) { c.Now = clk.now })

	anon := browser(t)
	for _, path := range []string{"/", "/devices/pi-1", "/tokens", "/audit", "/api/overview", "/events", "/nope"} {
		if r := do(t, anon, "GET", ts.URL+path, nil, nil); r.status != http.StatusUnauthorized || !strings.Contains(r.body, "fleetmq dashboard") || strings.Contains(r.body, "pi-1") {
			t.Errorf("GET %s without a login: %d %q", path, r.status, r.body)
		}
	}
	// A browser is sent to the form.
	if r := do(t, anon, "GET", ts.URL+"/devices/pi-1", nil, map[string]string{"Accept": "text/html"}); r.status != http.StatusSeeOther || r.header.Get("Location") != "/login" {
		t.Errorf("a browser without a login: %d to %q, want 303 to /login", r.status, r.header.Get("Location"))
	}
	if r := do(t, anon, "POST", ts.URL+"/tokens", url.Values{"count": {"1"}}, nil); r.status != http.StatusUnauthorized {
		t.Errorf("POST /tokens without a login: %d", r.status)
	}
	if _, minted := f.changes(); len(minted) != 0 {
		t.Fatalf("minted without a login: %+v", minted)
	}

	// The form: a code works once; its answer sets the cookie.
	code, err := ui.LoginCode(s)
	if err != nil {
		t.Fatal(err)
	}
	c := browser(t)
	page := do(t, c, "GET", ts.URL+"/login", nil, nil)
	if page.status != 200 || !strings.Contains(page.body, `name="code"`) {
		t.Fatalf("login form: %d %s", page.status, page.body)
	}
	// The command is shown as code, not between literal backquotes.
	if !strings.Contains(page.body, "<p>Run <code>fleetmq dashboard</code> on the machine") || strings.Contains(page.body, "`") {
		t.Errorf("login form text:\n%s", page.body)
	}
	tok := formToken(t, page.body)
	r := do(t, c, "POST", ts.URL+"/login", url.Values{"code": {code}, "csrf": {tok}}, nil)
	if r.status != http.StatusSeeOther || r.header.Get("Location") != "/" {
		t.Fatalf("login: %d %s", r.status, r.body)
	}
	ck := r.header.Get("Set-Cookie")
	for _, attr := range []string{"fleetmq_login=", "Path=/", "HttpOnly", "SameSite=Strict", "Max-Age=43200"} {
		if !strings.Contains(ck, attr) {
			t.Errorf("login cookie %q lacks %s", ck, attr)
		}
	}
	if r := do(t, c, "GET", ts.URL+"/devices/pi-1", nil, nil); r.status != 200 || !strings.Contains(r.body, "pi-1") {
		t.Fatalf("device page after login: %d", r.status)
	}
	other := browser(t)
	page = do(t, other, "GET", ts.URL+"/login", nil, nil)
	if r := do(t, other, "POST", ts.URL+"/login", url.Values{"code": {code}, "csrf": {formToken(t, page.body)}}, nil); r.status != http.StatusForbidden || !strings.Contains(r.body, "used up, expired or unknown: run <code>fleetmq dashboard</code> for a new one") {
		t.Errorf("code used twice: %d %q", r.status, r.body)
	}
	// Without the form's CSRF token, or expired, or unknown: refused.
	code, _ = ui.LoginCode(s)
	if r := do(t, browser(t), "POST", ts.URL+"/login", url.Values{"code": {code}}, nil); r.status != http.StatusForbidden {
		t.Errorf("login without the form's token: %d", r.status)
	}
	for name, code := range map[string]string{"unknown": "AAAA", "expired": code} {
		if name == "expired" {
			clk.set(clk.now().Add(5*time.Minute + time.Second))
		}
		b := browser(t)
		page := do(t, b, "GET", ts.URL+"/login", nil, nil)
		if r := do(t, b, "POST", ts.URL+"/login", url.Values{"code": {code}, "csrf": {formToken(t, page.body)}}, nil); r.status != http.StatusForbidden {
			t.Errorf("%s code: %d", name, r.status)
		}
	}
	// A code in the URL logs nobody in.
	code, _ = ui.LoginCode(s)
	if r := do(t, browser(t), "GET", ts.URL+"/login?code="+code, nil, nil); strings.Contains(r.header.Get("Set-Cookie"), "fleetmq_login") {
		t.Error("a code in the URL logged in")
	}

	// A forged cookie, or one of another fleetmq process, is worth nothing.
	ots := loggedInCookie(t)
	for name, value := range map[string]string{"forged": "99999999999.0.AAAA", "foreign": ots} {
		req, _ := http.NewRequest("GET", ts.URL+"/", nil)
		req.AddCookie(&http.Cookie{Name: "fleetmq_login", Value: value})
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s cookie: %d", name, resp.StatusCode)
		}
	}

	// The cookie is the user's who logged in: another Unix user's program
	// replaying it (it got it from a server of its own on another
	// loopback port: cookies ignore ports) is refused.
	c = loggedIn(t, s, ts.URL)
	u, _ := url.Parse(ts.URL)
	var stolen string
	for _, k := range c.Jar.Cookies(u) {
		if k.Name == "fleetmq_login" {
			stolen = k.Value
		}
	}
	if os.Getuid() == 0 {
		if curl, err := exec.LookPath("curl"); err == nil {
			cmd := exec.Command(curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-b", "fleetmq_login="+stolen, ts.URL+"/tokens")
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
			if out, err := cmd.Output(); err != nil || string(out) != "401" {
				t.Errorf("the login cookie replayed by user 4242: %s %v, want 401", out, err)
			}
		} else {
			t.Log("no curl: the replay by another user is not tried")
		}
	} else {
		t.Log("not root: the replay by another user is not tried")
	}

	// The login ends after 12 hours, and so does a stream opened with it.
	login := clk.now()
	clk.set(login.Add(ui.LoginTTL - 300*time.Millisecond))
	streamEnds(t, c, ts.URL+"/events?device=pi-1", "after the login ended")
	clk.set(login.Add(ui.LoginTTL))
	if r := do(t, c, "GET", ts.URL+"/", nil, nil); r.status != http.StatusUnauthorized {
		t.Errorf("after 12 hours: %d", r.status)
	}
}

// loggedInCookie is a login cookie of another dashboard (another process's
// key).
func loggedInCookie(tb testing.TB) string {
	tb.Helper()
	other, ots := newUI(tb, newFleet(), nil)
	c := loggedIn(tb, other, ots.URL)
	u, _ := url.Parse(ots.URL)
	for _, k := range c.Jar.Cookies(u) {
		if k.Name == "fleetmq_login" {
			return k.Value
		}
	}
	tb.Fatal("no login cookie from the other dashboard")
	return ""
}

func TestCodeSpans(t *testing.T) {
	for in, want := range map[string]string{
		"Run `fleetmq dashboard` now.": "Run <code>fleetmq dashboard</code> now.",
		"`a` and `<b>`":                "<code>a</code> and <code>&lt;b&gt;</code>",
		"one ` only <i>":               "one ` only &lt;i&gt;",
		"none":                         "none",
	} {
		if got := ui.CodeSpans(in); got != want {
			t.Errorf("CodeSpans(%q) = %q, want %q", in, got, want)
		}
	}
}

// Logging out ends a login before its 12 hours: the browser's cookie is
// cleared, a copy of it is refused from then on, and the pages' event
// streams end.
func TestLocalLogout(t *testing.T) {
	f := newFleet()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice})
	s, ts := newUI(t, f, nil)
	c := loggedIn(t, s, ts.URL)
	u, _ := url.Parse(ts.URL)
	var cookie string
	for _, k := range c.Jar.Cookies(u) {
		if k.Name == "fleetmq_login" {
			cookie = k.Value
		}
	}
	page := do(t, c, "GET", ts.URL+"/", nil, nil)
	if page.status != http.StatusOK || !strings.Contains(page.body, `action="/logout"`) {
		t.Fatalf("no logout button: %d\n%s", page.status, page.body)
	}
	// A cross-site form, or one without the page's token, logs no one out.
	if r := do(t, c, "POST", ts.URL+"/logout", url.Values{}, nil); r.status != http.StatusForbidden {
		t.Fatalf("logout without the CSRF token: %d", r.status)
	}
	ended := openStream(t, c, ts.URL+"/events")
	r := do(t, c, "POST", ts.URL+"/logout", url.Values{"csrf": {formToken(t, page.body)}}, nil)
	if r.status != http.StatusSeeOther || r.header.Get("Location") != "/login" {
		t.Fatalf("logout: %d to %q", r.status, r.header.Get("Location"))
	}
	waitEnd(t, ended, "after logging out")
	if r := do(t, c, "GET", ts.URL+"/", nil, nil); r.status != http.StatusUnauthorized {
		t.Errorf("the browser after logging out: %d", r.status)
	}
	copied := browser(t)
	copied.Jar.SetCookies(u, []*http.Cookie{{Name: "fleetmq_login", Value: cookie}})
	if r := do(t, copied, "GET", ts.URL+"/", nil, nil); r.status != http.StatusUnauthorized {
		t.Errorf("a copy of the cookie after logging out: %d", r.status)
	}
	// Logging in again works.
	if r := login(t, s, c, ts.URL, nil); r.status != http.StatusSeeOther {
		t.Fatalf("login after logout: %d", r.status)
	}
	if r := do(t, c, "GET", ts.URL+"/", nil, nil); r.status != http.StatusOK {
		t.Errorf("after logging in again: %d", r.status)
	}
}
