package ui_test

import (
	"net/http"
	"net/url"
	"strings"
	"sync"
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
// link from the admin socket: any other local account or process that can
// reach 127.0.0.1 gets nothing, not even the fleet's pages.
func TestLocalLogin(t *testing.T) {
	f := newFleet()
	f.addDevice(store.Device{ID: "pi-1", Role: store.RoleDevice})
	clk := &clock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	s, ts := newUI(t, f, func(c *ui.Config) { c.Now = clk.now })

	anon := browser(t)
	for _, path := range []string{"/", "/devices/pi-1", "/tokens", "/audit", "/api/overview", "/events", "/static/app.js", "/nope"} {
		if r := do(t, anon, "GET", ts.URL+path, nil, nil); r.status != http.StatusUnauthorized || !strings.Contains(r.body, "fleetmq dashboard") || strings.Contains(r.body, "pi-1") {
			t.Errorf("GET %s without a login: %d %q", path, r.status, r.body)
		}
	}
	if r := do(t, anon, "POST", ts.URL+"/tokens", map[string][]string{"count": {"1"}}, nil); r.status != http.StatusUnauthorized {
		t.Errorf("POST /tokens without a login: %d", r.status)
	}
	if _, minted := f.changes(); len(minted) != 0 {
		t.Fatalf("minted without a login: %+v", minted)
	}

	code, err := ui.LoginCode(s)
	if err != nil {
		t.Fatal(err)
	}
	c := browser(t)
	r := do(t, c, "GET", ts.URL+"/login?code="+code, nil, nil)
	if r.status != 200 || !strings.Contains(r.body, `http-equiv="refresh"`) {
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
	// A link works once, for five minutes, and only as a GET.
	if r := do(t, browser(t), "GET", ts.URL+"/login?code="+code, nil, nil); r.status != http.StatusForbidden || !strings.Contains(r.body, "used up, expired or unknown") {
		t.Errorf("link used twice: %d %q", r.status, r.body)
	}
	for name, get := range map[string]func() (string, error){
		"unknown": func() (string, error) { return "AAAA", nil },
		"expired": func() (string, error) {
			code, err := ui.LoginCode(s)
			clk.set(clk.now().Add(5*time.Minute + time.Second))
			return code, err
		},
	} {
		code, err := get()
		if err != nil {
			t.Fatal(err)
		}
		if r := do(t, browser(t), "GET", ts.URL+"/login?code="+code, nil, nil); r.status != http.StatusForbidden {
			t.Errorf("%s link: %d", name, r.status)
		}
	}
	code, _ = ui.LoginCode(s)
	if r := do(t, browser(t), "POST", ts.URL+"/login?code="+code, nil, nil); r.status != http.StatusMethodNotAllowed {
		t.Errorf("POST /login: %d", r.status)
	}

	// A forged cookie, or one of another fleetmq process, is worth nothing.
	other, ots := newUI(t, newFleet(), func(c *ui.Config) { c.Now = clk.now })
	oc := loggedIn(t, other, ots.URL)
	u, _ := url.Parse(ots.URL)
	var foreign string
	for _, ck := range oc.Jar.Cookies(u) {
		if ck.Name == "fleetmq_login" {
			foreign = ck.Value
		}
	}
	if foreign == "" {
		t.Fatal("no login cookie from the other dashboard")
	}
	for name, value := range map[string]string{"forged": "99999999999.AAAA", "foreign": foreign} {
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

	// The login ends after 12 hours, and so does a stream opened with it.
	c = loggedIn(t, s, ts.URL)
	login := clk.now()
	clk.set(login.Add(ui.LoginTTL - 300*time.Millisecond))
	streamEnds(t, c, ts.URL+"/events?device=pi-1", "after the login ended")
	clk.set(login.Add(ui.LoginTTL))
	if r := do(t, c, "GET", ts.URL+"/", nil, nil); r.status != http.StatusUnauthorized {
		t.Errorf("after 12 hours: %d", r.status)
	}
}
