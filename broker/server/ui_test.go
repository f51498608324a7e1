package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/fetch"
	"github.com/chromedp/chromedp"
	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/broker/ui"
	"github.com/fleetmq/fleetmq/store"
)

// chromiumPath is Debian's chromium, which scripts/test.sh installs.
const chromiumPath = "/usr/bin/chromium"

// newBrowser starts a headless chromium with a fresh profile and returns a
// tab's context, closed at cleanup.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	path := chromiumPath
	if _, err := os.Stat(path); err != nil {
		p, lerr := exec.LookPath("chromium")
		if lerr != nil {
			t.Fatalf("chromium is missing (%v): scripts/test.sh installs it (apt-get install chromium)", err)
		}
		path = p
	}
	actx, cancel := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 1000),
	)
	t.Cleanup(cancel)
	ctx, cancelTab := chromedp.NewContext(actx)
	t.Cleanup(cancelTab)
	ctx, cancelTime := context.WithTimeout(ctx, 90*time.Second)
	t.Cleanup(cancelTime)
	return ctx
}

// sample is the telemetry a Raspberry Pi agent publishes, with values that
// make a plot worth looking at.
func sample(i int) string {
	return fmt.Sprintf(`{"time":"-","uptime_s":%d,"load1":%.2f,"load5":%.2f,"load15":0.31,"mem_total_kb":948304,`+
		`"mem_available_kb":%d,"disk_free_bytes":%d,"cpu_temp_c":%.1f,"wifi_signal_dbm":%d,"agent_version":"1.4.2"}`,
		86400+60*i, 0.35+0.3*math.Pow(math.Sin(float64(i)/3), 2), 0.4+0.05*math.Sin(float64(i)/6),
		612000-1800*i+int(15000*math.Cos(float64(i)/4)), 11_800_000_000-int64(i)*2_000_000,
		47+6*math.Sin(float64(i)/5)+0.15*float64(i), -58-int(4*math.Cos(float64(i)/2)))
}

// TestDashboardInBrowser drives the dashboard in a real browser: the
// overview shows the enrolled device online, its page plots exactly the
// published samples and adds a new one live, and revoking it from the page
// (button, then confirmation) disconnects its MQTT client.
func TestDashboardInBrowser(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	base := strings.TrimSuffix(s.UIURL(), "/")
	if !strings.HasPrefix(base, "http://127.0.0.1:") {
		t.Fatalf("loopback dashboard at %q", base)
	}
	d := s.enroll(t, s.token(t, "--device", "pi-0001", "--label", "site=greenhouse"), "pi-0001")
	d2 := s.enroll(t, s.token(t, "--device", "pi-0002", "--label", "site=greenhouse"), "pi-0002")
	s.enroll(t, s.token(t, "--device", "pi-0003", "--label", "site=barn"), "pi-0003")
	lost := make(chan error, 1)
	c := pahoClient(t, s, d, "pi-0001", lost)
	defer c.Disconnect(0)

	// Samples a minute apart, on the server's clock.
	const published = 24
	for i := range published {
		tok := c.Publish("devices/pi-0001/telemetry", 1, false, sample(i))
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
		s.clock.Advance(time.Minute)
	}
	ctx := newBrowser(t)

	// Log in: the dashboard sends the browser to its form, where the code
	// `fleetmq dashboard` prints is entered.
	loginURL, code := s.dashboardCode(t)
	if loginURL != base+"/login" {
		t.Fatalf("login page %q, want %s/login", loginURL, base)
	}
	browserLogin(t, ctx, base, code)

	// Overview: one device online, two offline.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/"), chromedp.WaitVisible(chromedp.CSS("#count-online"))); err != nil {
		t.Fatalf("overview: %v", err)
	}
	for id, want := range map[string]string{"#count-online": "1", "#count-offline": "2", "#count-revoked": "0"} {
		got, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(id)))
		if err != nil || got != want {
			t.Errorf("overview %s = %q (%v), want %q", id, got, err, want)
		}
	}
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/devices?q=greenhouse"), chromedp.WaitVisible(chromedp.CSS("#devices"))); err != nil {
		t.Fatal(err)
	}
	state, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`#devices [data-presence="pi-0001"]`)))
	if err != nil || state != "online" {
		t.Errorf("device table: pi-0001 %q (%v)", state, err)
	}
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#devices tbody tr").length`))
	if err != nil || rows != 2 {
		t.Errorf("search for greenhouse: %d rows (%v), want 2", rows, err)
	}

	// A device that connects after the page was rendered but before its
	// event stream opened sends no event that stream could carry: the
	// stream's first event, the identities online, shows it. The browser
	// holds the stream's request while pi-0002 connects.
	if _, err := chromedp.Call(ctx, fetch.Enable, fetch.EnableParams{Patterns: []*fetch.RequestPattern{{URLPattern: base + "/events"}}}); err != nil {
		t.Fatalf("intercept the event stream: %v", err)
	}
	held, err := chromedp.Run(ctx, chromedp.WaitEvent(fetch.RequestPaused, nil, chromedp.Reload()))
	if err != nil {
		t.Fatalf("reload with the event stream held: %v", err)
	}
	if state, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`#devices [data-presence="pi-0002"]`))); err != nil || state != "offline" {
		t.Fatalf("device table: pi-0002 %q (%v), want offline", state, err)
	}
	// Another tab sees pi-0002 connect: the change has gone out as an
	// event before the held stream is let go.
	other, closeOther := chromedp.NewContext(ctx)
	defer closeOther()
	if err := chromedp.Do(other, chromedp.Navigate(base+"/devices?q=greenhouse"), chromedp.WaitVisible(chromedp.CSS("#devices"))); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Run(other, chromedp.Poll[bool](`document.body.dataset.live === "open"`, chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("event stream of the other tab not open: %v", err)
	}
	c2 := pahoClient(t, s, d2, "pi-0002", nil)
	defer c2.Disconnect(0)
	if _, err := chromedp.Run(other, chromedp.Poll[bool](`document.querySelector('#devices [data-presence="pi-0002"]').textContent === "online"`,
		chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("the other tab does not see pi-0002 connect: %v", err)
	}
	if _, err := chromedp.Call(ctx, fetch.ContinueRequest, fetch.ContinueRequestParams{RequestID: held.RequestID}); err != nil {
		t.Fatalf("let the event stream go: %v", err)
	}
	if _, err := chromedp.Call(ctx, fetch.Disable, cdp.Empty{}); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.querySelector('#devices [data-presence="pi-0002"]').textContent === "online"`,
		chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		state, _ := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`#devices [data-presence="pi-0002"]`)))
		t.Fatalf("pi-0002, connected before the stream opened, shows %q: %v", state, err)
	}

	// Plots that appear live are captioned as the server captions them:
	// the friendly name of a Pi field, and what a device sent escaped
	// (found by hand: raw names, bidirectional controls included).
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/devices/pi-0002"), chromedp.WaitVisible(chromedp.CSS("#no-telemetry"))); err != nil {
		t.Fatalf("device page of pi-0002: %v", err)
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.body.dataset.live === "open"`, chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("event stream not open: %v", err)
	}
	if tok := c2.Publish("devices/pi-0002/telemetry", 1, false, `{"cpu_temp_c": 50, "\u202ex\u001b": 1, "constructor": 2}`); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.querySelectorAll("#charts figcaption").length === 3`, chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("live plots not added: %v", err)
	}
	captions, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](`Array.from(document.querySelectorAll("#charts figcaption"), (e) => e.textContent)`))
	slices.Sort(captions)
	if want := []string{"CPU temperature, °C", `\u202ex\x1b`, "constructor"}; err != nil || !slices.Equal(captions, want) {
		t.Errorf("live plot captions %q (%v), want %q", captions, err, want)
	}

	// Device page: one circle per published sample in each plot.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/devices/pi-0001"),
		chromedp.WaitVisible(chromedp.CSS(`svg.plot[data-field="cpu_temp_c"] circle`))); err != nil {
		t.Fatalf("device page: %v", err)
	}
	countPoints := func(field string) int {
		t.Helper()
		n, err := chromedp.Run(ctx, chromedp.Evaluate[int](
			fmt.Sprintf(`document.querySelectorAll('svg.plot[data-field=%q] circle').length`, field)))
		if err != nil {
			t.Fatalf("count points of %s: %v", field, err)
		}
		return n
	}
	for _, field := range []string{"cpu_temp_c", "load1", "mem_available_kb", "wifi_signal_dbm"} {
		if n := countPoints(field); n != published {
			t.Errorf("plot of %s has %d points, want %d", field, n, published)
		}
	}
	if n := countPoints("agent_version"); n != 0 {
		t.Errorf("a string field is plotted (%d points)", n)
	}
	// The first plot is the CPU temperature, and its first point is the
	// first sample's value.
	first, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector("#charts figure figcaption").textContent`))
	if err != nil || !strings.HasPrefix(first, "CPU temperature") {
		t.Errorf("first plot %q (%v)", first, err)
	}
	tip, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector('svg.plot[data-field="cpu_temp_c"] circle title').textContent`))
	if err != nil || !strings.HasPrefix(tip, "47 at ") {
		t.Errorf("first point's title %q (%v), want the first sample, 47", tip, err)
	}
	version, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("dl.facts")))
	if err != nil || !strings.Contains(version, "1.4.2") {
		t.Errorf("agent version not shown: %q (%v)", version, err)
	}

	// A new sample appears without a reload, once the stream is open.
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.body.dataset.live === "open"`, chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("event stream not open: %v", err)
	}
	if tok := c.Publish("devices/pi-0001/telemetry", 1, false, sample(published)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](
		fmt.Sprintf(`document.querySelectorAll('svg.plot[data-field="cpu_temp_c"] circle').length === %d`, published+1),
		chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("live sample not plotted (%d points): %v", countPoints("cpu_temp_c"), err)
	}

	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	shot := filepath.Join(t.TempDir(), "dashboard.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", shot)
	if os.Getenv("UPDATE_SCREENSHOT") == "1" {
		if err := os.WriteFile(filepath.Join("..", "..", "docs", "dashboard.png"), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// A message with a hundred numeric fields adds plots only up to the
	// page's limit (found by hand: 3,000 fields froze the page).
	var wide strings.Builder
	wide.WriteString(`{"cpu_temp_c":50`)
	for i := range 100 {
		fmt.Fprintf(&wide, `,"f%03d":%d`, i, i)
	}
	wide.WriteString("}")
	if tok := c.Publish("devices/pi-0001/telemetry", 1, false, wide.String()); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](
		fmt.Sprintf(`document.querySelectorAll('svg.plot[data-field="cpu_temp_c"] circle').length === %d`, published+2),
		chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("wide sample not plotted: %v", err)
	}
	if n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#charts figure.chart").length`)); err != nil || n > 12 {
		t.Errorf("%d plots after a message with 100 fields, want at most 12 (%v)", n, err)
	}

	// Revoke from the page: the button leads to a confirmation page, whose
	// button revokes.
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#revoke")), chromedp.WaitVisible(chromedp.CSS("#confirm"))); err != nil {
		t.Fatalf("revoke button: %v", err)
	}
	select {
	case err := <-lost:
		t.Fatalf("disconnected before the confirmation: %v", err)
	default:
	}
	if dev, err := s.Store().Device(context.Background(), "pi-0001"); err != nil || dev.Revoked() {
		t.Fatalf("revoked before the confirmation: %v", err)
	}
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#confirm")), chromedp.WaitVisible(chromedp.CSS(".flash"))); err != nil {
		t.Fatalf("confirm: %v", err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the MQTT client is still connected after revoking from the dashboard")
	}
	state, err = chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#state")))
	if err != nil || state != "revoked" {
		t.Errorf("device page after revoking: state %q (%v)", state, err)
	}
	evs, err := s.Store().Audit(context.Background(), store.AuditFilter{DeviceID: "pi-0001"})
	if err != nil || len(evs) == 0 || evs[len(evs)-1].Action != store.ActDeviceRevoke || evs[len(evs)-1].Remote != "ui:local" {
		t.Fatalf("audit of the revocation: %v %+v", err, evs)
	}
	if slices.Contains(s.Broker().Online(), "pi-0001") {
		t.Error("pi-0001 still listed online by the broker")
	}

	// The Devices page revokes a selection: boxes ticked, its button,
	// then the confirmation's. Plain forms: no script takes part.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/devices"), chromedp.WaitVisible(chromedp.CSS("#revoke-selection")),
		chromedp.Click(chromedp.CSS(`#devices input[value="pi-0002"]`)), chromedp.Click(chromedp.CSS(`#devices input[value="pi-0003"]`)),
		chromedp.Click(chromedp.CSS("#revoke-selection")), chromedp.WaitVisible(chromedp.CSS("#confirm"))); err != nil {
		t.Fatalf("revoke a selection: %v", err)
	}
	if listed, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#selection tbody"))); err != nil ||
		!strings.Contains(listed, "pi-0002") || !strings.Contains(listed, "pi-0003") || strings.Contains(listed, "pi-0001") {
		t.Fatalf("the confirmation lists %q (%v), want pi-0002 and pi-0003", listed, err)
	}
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#confirm")), chromedp.WaitVisible(chromedp.CSS("#outcome"))); err != nil {
		t.Fatalf("confirm the selection: %v", err)
	}
	if outcome, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#outcome"))); err != nil || !strings.HasPrefix(outcome, "2 revoked") {
		t.Errorf("outcome %q (%v), want 2 revoked", outcome, err)
	}
	for _, id := range []string{"pi-0002", "pi-0003"} {
		if dev, err := s.Store().Device(context.Background(), id); err != nil || !dev.Revoked() {
			t.Errorf("%s not revoked from the selection: %v", id, err)
		}
	}
}

// browserLogin enters code, as `fleetmq dashboard` printed it, where the
// dashboard sends the browser.
func browserLogin(t *testing.T, ctx context.Context, base, code string) {
	t.Helper()
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/"), chromedp.WaitVisible(chromedp.CSS(`input[name="code"]`)),
		chromedp.SendKeys(`input[name="code"]`, code), chromedp.Submit(`input[name="code"]`),
		chromedp.WaitVisible(chromedp.CSS("#count-online"))); err != nil {
		t.Fatalf("login: %v", err)
	}
}

// TestDashboardTokenReplace: the token form refuses a second usable token
// for an id with a page that says what to do in the dashboard (no CLI
// advice), and offers to create it again with "replace"; that, or the
// form's replace box, revokes the usable token as the CLI's --replace does.
func TestDashboardTokenReplace(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	base := strings.TrimSuffix(s.UIURL(), "/")
	s.token(t, "--device", "pi-0007")
	ctx := newBrowser(t)
	_, code := s.dashboardCode(t)
	browserLogin(t, ctx, base, code)
	tokens := func() []store.Token {
		t.Helper()
		toks, err := s.Store().Tokens(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return toks
	}
	create := func(replace bool) {
		t.Helper()
		acts := []chromedp.Action[chromedp.Void]{chromedp.Navigate(base + "/tokens"), chromedp.WaitVisible(chromedp.CSS(`input[name="device"]`)),
			chromedp.SendKeys(`input[name="device"]`, "pi-0007")}
		if replace {
			acts = append(acts, chromedp.Click(`input[name="replace"]`))
		}
		acts = append(acts, chromedp.Submit(`input[name="device"]`), chromedp.WaitVisible(chromedp.CSS("#confirm")),
			chromedp.Click(chromedp.CSS("#confirm")), chromedp.WaitVisible(chromedp.CSS("#new-tokens, p.error")))
		if err := chromedp.Do(ctx, acts...); err != nil {
			t.Fatalf("token form (replace %v): %v", replace, err)
		}
	}

	create(false)
	refusal, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("p.error")))
	if err != nil {
		t.Fatalf("no refusal shown: %v", err)
	}
	if !strings.Contains(refusal, "pi-0007 already has a usable token") || !strings.Contains(refusal, "“replace” ticked") ||
		strings.Contains(refusal, "fleetmq") || strings.Contains(refusal, "--replace") {
		t.Fatalf("refusal %q: want what to do in the dashboard, and no CLI advice", refusal)
	}
	first := tokens()
	if len(first) != 1 {
		t.Fatalf("%d tokens after the refusal, want the first alone", len(first))
	}
	if row, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#live-tokens tbody"))); err != nil || !strings.Contains(row, first[0].ID) {
		t.Errorf("the refusal does not list the usable token %s: %q (%v)", first[0].ID, row, err)
	}

	// Its button leads to the confirmation of the same form, replacing.
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#replace-again")), chromedp.WaitVisible(chromedp.CSS("#confirm"))); err != nil {
		t.Fatalf("create with replace: %v", err)
	}
	if facts, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("dl.facts"))); err != nil || !strings.Contains(facts, "Replaces") {
		t.Errorf("the confirmation does not say it replaces: %q (%v)", facts, err)
	}
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#confirm")), chromedp.WaitVisible(chromedp.CSS("#new-tokens"))); err != nil {
		t.Fatalf("confirm the replacement: %v", err)
	}
	// The form's box does the same.
	create(true)
	if _, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#new-tokens"))); err != nil {
		t.Fatalf("replace box: no token created: %v", err)
	}

	now := s.clock.Now()
	toks := tokens()
	live := 0
	for _, tok := range toks {
		if tok.DeviceID != "pi-0007" {
			t.Errorf("token %s bound to %q", tok.ID, tok.DeviceID)
		}
		if tok.Check(now) == nil {
			live++
		}
	}
	if len(toks) != 3 || live != 1 {
		t.Fatalf("%d tokens, %d usable: want 3, the last alone usable", len(toks), live)
	}
	evs, err := s.Store().Audit(context.Background(), store.AuditFilter{DeviceID: "pi-0007"})
	if err != nil {
		t.Fatal(err)
	}
	replaced := 0
	for _, ev := range evs {
		if ev.Action == store.ActTokenRevoke && strings.HasPrefix(ev.Detail, "replaced by token ") && ev.Remote == "ui:local" {
			replaced++
		}
	}
	if replaced != 2 {
		t.Errorf("%d token.revoke events replaced by the dashboard, want 2: %+v", replaced, evs)
	}
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// dashboardCode is the login page and a one-time code, as `fleetmq
// dashboard` prints them.
func (s *testServer) dashboardCode(tb testing.TB) (string, string) {
	tb.Helper()
	out, errs, code := s.cli(tb, "dashboard")
	var page, secret string
	if _, err := fmt.Sscanf(out, "open %s and enter the code %s", &page, &secret); code != 0 || err != nil {
		tb.Fatalf("fleetmq dashboard: exit %d: %s%s (%v)", code, out, errs, err)
	}
	return page, secret
}

// login logs hc, which must keep cookies, in to the loopback dashboard
// through its form, and returns the answer to the form.
func (s *testServer) login(tb testing.TB, hc *http.Client) int {
	tb.Helper()
	page, code := s.dashboardCode(tb)
	resp, err := hc.Get(page)
	if err != nil {
		tb.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := csrfField.FindStringSubmatch(string(body))
	if m == nil {
		tb.Fatalf("login form: %d %s", resp.StatusCode, body)
	}
	resp, err = hc.PostForm(page, url.Values{"code": {code}, "csrf": {m[1]}})
	if err != nil {
		tb.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestDashboardLogin: the loopback dashboard is for whoever may use the
// admin socket. Without a code from it, a local client gets nothing; a code
// works once; `fleetmq dashboard` says why there is no code when the
// dashboard is off or on the network.
func TestDashboardLogin(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	s.enroll(t, s.token(t, "--device", "pi-l1"), "pi-l1")
	for _, path := range []string{"", "devices/pi-l1", "tokens/new?count=1&prefix=x-"} {
		resp, err := http.Get(s.UIURL() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || strings.Contains(string(body), "pi-l1") || !strings.Contains(string(body), "fleetmq dashboard") {
			t.Errorf("/%s without a login: %d %q", path, resp.StatusCode, body)
		}
	}
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, Timeout: 10 * time.Second}
	if status := s.login(t, hc); status != 200 { // the 303 followed to the overview
		t.Fatalf("login: %d", status)
	}
	resp, err := hc.Get(s.UIURL() + "devices/pi-l1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "pi-l1") {
		t.Errorf("device page after login: %d", resp.StatusCode)
	}
	if out, _, code := s.cli(t, "dashboard", "--json"); code != 0 || !strings.Contains(out, `"url": "http://127.0.0.1:`) || !strings.Contains(out, `"code": "`) {
		t.Errorf("dashboard --json: exit %d: %s", code, out)
	}

	off := startServer(t, func(c *server.Config) { c.UIAddr = "off" })
	if _, errs, code := off.cli(t, "dashboard"); code == 0 || !strings.Contains(errs, "the dashboard is off") {
		t.Errorf("dashboard off: exit %d: %s", code, errs)
	}
}

// TestDashboardCSRF posts state changes to a real node without the form's
// token, with a wrong one and cross-origin: all are refused with 403 and
// change nothing.
func TestDashboardCSRF(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	base := strings.TrimSuffix(s.UIURL(), "/")
	s.enroll(t, s.token(t, "--device", "pi-x"), "pi-x")
	s.token(t, "--device", "pi-y")
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	s.login(t, hc)
	get := func(path string) string {
		t.Helper()
		resp, err := hc.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
		}
		return string(b)
	}
	post := func(path string, form url.Values, hdr map[string]string) int {
		t.Helper()
		req, _ := http.NewRequest("POST", base+path, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	m := csrfField.FindStringSubmatch(get("/devices/pi-x/revoke"))
	if m == nil {
		t.Fatal("no CSRF token on the confirmation page")
	}
	tok := m[1]
	toks, err := s.Store().Tokens(context.Background())
	if err != nil || len(toks) != 2 {
		t.Fatalf("tokens: %v", err)
	}
	before := s.snapshot(t)
	for _, tc := range []struct {
		name, path string
		form       url.Values
		hdr        map[string]string
	}{
		{"revoke device, no token", "/devices/pi-x/revoke", url.Values{"confirm": {"yes"}}, nil},
		{"revoke device, wrong token", "/devices/pi-x/revoke", url.Values{"confirm": {"yes"}, "csrf": {strings.Repeat("A", len(tok))}}, nil},
		{"revoke device, cross-origin", "/devices/pi-x/revoke", url.Values{"confirm": {"yes"}, "csrf": {tok}}, map[string]string{"Origin": "https://evil.example"}},
		{"create token, no token", "/tokens", url.Values{"confirm": {"yes"}, "device": {"pi-z"}}, nil},
		{"create token, wrong token", "/tokens", url.Values{"confirm": {"yes"}, "device": {"pi-z"}, "csrf": {tok + "x"}}, nil},
		{"revoke token, no token", "/tokens/" + toks[0].ID + "/revoke", url.Values{"confirm": {"yes"}}, nil},
		{"revoke selection, no token", "/devices/revoke", url.Values{"confirm": {"yes"}, "id": {"pi-x"}}, nil},
		{"revoke selection, cross-origin", "/devices/revoke", url.Values{"confirm": {"yes"}, "id": {"pi-x"}, "csrf": {tok}}, map[string]string{"Origin": "https://evil.example"}},
		{"revoke token, cross-site", "/tokens/" + toks[0].ID + "/revoke", url.Values{"confirm": {"yes"}, "csrf": {tok}}, map[string]string{"Sec-Fetch-Site": "cross-site"}},
	} {
		if code := post(tc.path, tc.form, tc.hdr); code != http.StatusForbidden {
			t.Errorf("%s: %d, want 403", tc.name, code)
		}
	}
	if after := s.snapshot(t); after != before {
		t.Fatalf("refused requests changed the fleet:\nbefore %s\nafter  %s", before, after)
	}
	// The same session with its token is obeyed.
	if code := post("/devices/pi-x/revoke", url.Values{"confirm": {"yes"}, "csrf": {tok}}, nil); code != http.StatusSeeOther {
		t.Fatalf("revoke with the token: %d", code)
	}
	if dev, err := s.Store().Device(context.Background(), "pi-x"); err != nil || !dev.Revoked() {
		t.Fatalf("not revoked: %v", err)
	}
}

// TestDashboardOnNetworkNeedsOperator binds the dashboard to all
// interfaces: it then speaks HTTPS only and serves operator certificates
// only.
func TestDashboardOnNetworkNeedsOperator(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "0.0.0.0:0" })
	u, err := url.Parse(s.UIURL())
	if err != nil || u.Scheme != "https" {
		t.Fatalf("dashboard on 0.0.0.0 at %q", s.UIURL())
	}
	base := "https://127.0.0.1:" + u.Port()
	if _, errs, code := s.cli(t, "dashboard"); code == 0 || !strings.Contains(errs, "operators log in with a certificate") {
		t.Errorf("fleetmq dashboard for a network dashboard: exit %d: %s", code, errs)
	}
	dir := t.TempDir()
	for _, args := range [][]string{
		{"operator", "issue", "ops", "--out", dir},
		{"service", "issue", "backend", "--out", dir},
	} {
		out, errs, code := s.cli(t, args...)
		if code != 0 {
			t.Fatalf("%v: %s", args, errs)
		}
		if args[0] == "operator" && !strings.Contains(out, "openssl pkcs12 -export") {
			t.Errorf("operator issue does not say how to make a browser bundle:\n%s", out)
		}
	}
	load := func(name string) *tls.Certificate {
		t.Helper()
		c, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key"))
		if err != nil {
			t.Fatal(err)
		}
		return &c
	}
	dev := s.enroll(t, s.token(t), "pi-n1")
	get := func(cert *tls.Certificate) (int, string, error) {
		cfg := &tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1"}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		tr := &http.Transport{TLSClientConfig: cfg}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(base + "/")
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	if code, _, err := get(nil); err == nil {
		t.Fatalf("no client certificate: %d, want a refused handshake", code)
	}
	for name, cert := range map[string]*tls.Certificate{"device": dev.tlsCert(), "service": load("backend")} {
		if code, body, err := get(cert); err != nil || code != http.StatusForbidden || strings.Contains(body, "pi-n1") {
			t.Errorf("%s certificate: %d %v %q", name, code, err, body)
		}
	}
	code, body, err := get(load("ops"))
	if err != nil || code != 200 || !strings.Contains(body, "operator <b>ops</b>") {
		t.Fatalf("operator certificate: %d %v", code, err)
	}
	// Plain HTTP is not spoken at all.
	if resp, err := http.Get("http://127.0.0.1:" + u.Port() + "/"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatal("plain HTTP served on a network address")
		}
	}
	// A revoked operator is refused at once, and the live stream it had
	// open ends.
	cfg := &tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1", Certificates: []tls.Certificate{*load("ops")}}
	tr := &http.Transport{TLSClientConfig: cfg}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(base + "/events?device=pi-n1")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("event stream: %v %v", resp, err)
	}
	defer resp.Body.Close()
	first := make([]byte, 64)
	if _, err := resp.Body.Read(first); err != nil {
		t.Fatalf("event stream: %v", err)
	}
	ended := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, resp.Body)
		ended <- err
	}()
	if _, errs, code := s.cli(t, "device", "revoke", "ops"); code != 0 {
		t.Fatal(errs)
	}
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the revoked operator's event stream is still open")
	}
	if code, _, err := get(load("ops")); err != nil || code != http.StatusForbidden {
		t.Fatalf("revoked operator: %d %v", code, err)
	}
}

// TestDashboardSocketsPerAddress: on the network the dashboard takes a
// bounded number of connections from one address, so sockets held open
// before any handshake from one host do not lock the operators out.
func TestDashboardSocketsPerAddress(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "0.0.0.0:0" })
	u, err := url.Parse(s.UIURL())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if _, errs, code := s.cli(t, "operator", "issue", "ops", "--out", dir); code != 0 {
		t.Fatal(errs)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "ops.pem"), filepath.Join(dir, "ops.key"))
	if err != nil {
		t.Fatal(err)
	}
	// The flood comes from 127.0.0.2, the operator from 127.0.0.1.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 5 * time.Second}
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			_ = c.Close()
		}
	})
	for range ui.MaxConnections + 44 {
		c, err := d.Dial("tcp", "127.0.0.1:"+u.Port())
		if err != nil {
			t.Fatalf("flood: %v", err)
		}
		held = append(held, c)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://127.0.0.1:" + u.Port() + "/")
	if err != nil {
		t.Fatalf("operator while one address holds %d sockets: %v", len(held), err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("operator: %d", resp.StatusCode)
	}
}

// TestDashboardTokenFormChecked: the confirmation page refuses what the
// creation would refuse (found by hand: it confirmed, then Create failed),
// and a count without a prefix is refused rather than minted for the bare
// ids 0001….
func TestDashboardTokenFormChecked(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	before, _, _ := s.cli(t, "token", "list", "--json")
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, Timeout: 10 * time.Second}
	s.login(t, hc)
	for query, want := range map[string]string{
		"count=5":            "count needs a prefix",
		"uses=2000000":       "uses must be between",
		"ttl=1000d":          "ttl must be",
		"count=5&device=foo": "exclude device_id",
		"device=BAD+ID":      "id must be lower case",
		"reprovision=yes":    "reprovision needs",
		"labels=a%3D1,a%3D2": "label a is given twice",
		"replace=yes":        "replace needs device_id or count",
	} {
		resp, err := hc.Get(s.UIURL() + "tokens/new?" + query)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), want) {
			t.Errorf("/tokens/new?%s: %d, want 400 saying %q", query, resp.StatusCode, want)
		}
	}
	if after, _, _ := s.cli(t, "token", "list", "--json"); after != before {
		t.Fatal("a refused confirmation minted tokens")
	}
}

// dashboardBrowser logs a client that keeps cookies and does not follow
// redirects in to the loopback dashboard, and returns how it sends a
// request (a form, urlencoded) and reads the answer.
func (s *testServer) dashboardBrowser(tb testing.TB) func(method, path string, form url.Values) (int, string) {
	tb.Helper()
	base := strings.TrimSuffix(s.UIURL(), "/")
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, Timeout: 20 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	s.login(tb, hc)
	return func(method, path string, form url.Values) (int, string) {
		tb.Helper()
		req, _ := http.NewRequest(method, base+path, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := hc.Do(req)
		if err != nil {
			tb.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
}

// TestDashboardCommand: the device page's command form sends through the
// real broker and shows the device's reply; a refusal is shown with the
// form, and nothing is sent.
func TestDashboardCommand(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	d := s.enroll(t, s.token(t, "--device", "pi-dc"), "pi-dc")
	s.enroll(t, s.token(t, "--device", "pi-away"), "pi-away")
	got := make(chan string, 8)
	c := pahoClient(t, s, d, "pi-dc", nil)
	defer c.Disconnect(0)
	tok := c.Subscribe("devices/pi-dc/commands/#", 1, func(cl paho.Client, m paho.Message) {
		got <- m.Topic() + " " + string(m.Payload())
		if strings.HasSuffix(m.Topic(), "/ping") {
			cl.Publish("devices/pi-dc/events/pong", 1, false, `{"request":"`+string(m.Payload())+`"}`)
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	do := s.dashboardBrowser(t)
	code, page := do("GET", "/devices/pi-dc", nil)
	m := csrfField.FindStringSubmatch(page)
	if code != 200 || m == nil || !strings.Contains(page, `id="command-form"`) {
		t.Fatalf("device page: %d, no command form or CSRF token", code)
	}
	csrf := m[1]

	code, page = do("POST", "/devices/pi-dc/command", url.Values{"csrf": {csrf}, "name": {"ping"}, "payload": {"p-42"}})
	if code != 200 || !strings.Contains(page, `id="command-reply"`) || !strings.Contains(page, "devices/pi-dc/events/pong") ||
		!strings.Contains(page, "&#34;request&#34;: &#34;p-42&#34;") {
		t.Fatalf("ping from the dashboard: %d\n%s", code, page)
	}
	if g := <-got; g != "devices/pi-dc/commands/ping p-42" {
		t.Fatalf("device got %q", g)
	}

	// Refusals: shown on the page with what was typed; nothing sent.
	for _, tc := range []struct {
		path, name string
		status     int
		want       string
	}{
		{"/devices/pi-away/command", "renew", http.StatusConflict, "pi-away is not connected"},
		{"/devices/pi-dc/command", "a/+", http.StatusBadRequest, "cannot be a command"},
	} {
		code, page := do("POST", tc.path, url.Values{"csrf": {csrf}, "name": {tc.name}})
		if code != tc.status || !strings.Contains(page, "Not sent:") || !strings.Contains(page, tc.want) {
			t.Errorf("command %s on %s: %d\n%s", tc.name, tc.path, code, page)
		}
	}
	if code, _ := do("POST", "/devices/pi-dc/command", url.Values{"name": {"ping"}}); code != http.StatusForbidden {
		t.Errorf("command without the form token: %d, want 403", code)
	}
	select {
	case g := <-got:
		t.Fatalf("a refused command reached the device: %s", g)
	default:
	}

	// A device that leaves instead of answering ends the wait, and the
	// page says so rather than that no event came within 5 s.
	c.AddRoute("devices/pi-dc/commands/bye", func(cl paho.Client, _ paho.Message) { go cl.Disconnect(0) })
	code, page = do("POST", "/devices/pi-dc/command", url.Values{"csrf": {csrf}, "name": {"bye"}})
	if code != 200 || !strings.Contains(page, "The device disconnected before answering.") {
		t.Errorf("command the device leaves on: %d\n%s", code, page)
	}

	if _, _, code := s.cli(t, "device", "revoke", "pi-away"); code != 0 {
		t.Fatal("revoke failed")
	}
	if code, page := do("GET", "/devices/pi-away", nil); code != 200 || strings.Contains(page, `id="command-form"`) {
		t.Errorf("a revoked device's page offers commands: %d", code)
	}
}

var hiddenID = regexp.MustCompile(`<input type="hidden" name="id" value="([^"]+)">`)

// TestDashboardRevokeSelected revokes devices ticked on the Devices page
// of a real node: the selection leads to a confirmation page listing it,
// whose form revokes it in one request; connected devices are
// disconnected, the CRL lists them, each is audited once. A selection with
// an id revoked before reports it; one with an unknown id, none, or
// without the form token changes nothing.
func TestDashboardRevokeSelected(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	devs := map[string]*device{}
	for _, id := range []string{"pi-s1", "pi-s2", "pi-s3", "pi-s4", "pi-s5", "pi-s6"} {
		devs[id] = s.enroll(t, s.token(t, "--device", id), id)
	}
	lost := map[string]chan error{}
	for _, id := range []string{"pi-s1", "pi-s2"} {
		lost[id] = make(chan error, 1)
		c := pahoClient(t, s, devs[id], id, lost[id])
		defer c.Disconnect(0)
	}

	do := s.dashboardBrowser(t)
	code, page := do("GET", "/devices", nil)
	m := csrfField.FindStringSubmatch(page)
	if code != 200 || m == nil || !strings.Contains(page, `<form id="revoke-selected"`) ||
		!strings.Contains(page, `name="id" value="pi-s1" form="revoke-selected"`) {
		t.Fatalf("devices page: %d, no selection form or box:\n%s", code, page)
	}
	csrf := m[1]
	revokes := func(id string) int {
		t.Helper()
		evs, err := s.Store().Audit(context.Background(), store.AuditFilter{DeviceID: id})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, ev := range evs {
			if ev.Action == store.ActDeviceRevoke && ev.Remote == "ui:local" {
				n++
			}
		}
		return n
	}

	// Refused whole, before or at the confirmation: nothing changes.
	before := s.snapshot(t)
	for _, tc := range []struct {
		name   string
		form   url.Values
		status int
		want   string
	}{
		{"no form token", url.Values{"confirm": {"yes"}, "id": {"pi-s1", "pi-s2", "pi-s3"}}, http.StatusForbidden, "reload the page"},
		{"empty selection", url.Values{"csrf": {csrf}}, http.StatusBadRequest, "No identity was selected"},
		{"empty selection, confirmed", url.Values{"csrf": {csrf}, "confirm": {"yes"}}, http.StatusBadRequest, "No identity was selected"},
		{"unknown id", url.Values{"csrf": {csrf}, "id": {"pi-s4", "pi-forged"}}, http.StatusNotFound, `No identity &#34;pi-forged&#34; (1 of the 2 selected), so nothing was revoked`},
		{"unknown id, confirmed", url.Values{"csrf": {csrf}, "confirm": {"yes"}, "id": {"pi-s4", "pi-forged"}}, http.StatusNotFound, `No identity &#34;pi-forged&#34; (1 of the 2 selected), so nothing was revoked`},
		{"malformed id, confirmed", url.Values{"csrf": {csrf}, "confirm": {"yes"}, "id": {"pi-s4", "Pi/X"}}, http.StatusBadRequest, "nothing was revoked"},
	} {
		if code, page := do("POST", "/devices/revoke", tc.form); code != tc.status || !strings.Contains(page, tc.want) {
			t.Errorf("%s: %d, want %d and %q:\n%s", tc.name, code, tc.status, tc.want, page)
		}
	}
	if after := s.snapshot(t); after != before {
		t.Fatalf("refused selections changed the fleet:\nbefore %s\nafter  %s", before, after)
	}

	// Three ticked, two of them connected: the confirmation lists them
	// and revokes nothing yet.
	code, page = do("POST", "/devices/revoke", url.Values{"csrf": {csrf}, "id": {"pi-s1", "pi-s2", "pi-s3"}})
	if code != 200 || !strings.Contains(page, "Revoke 3 identities?") || !strings.Contains(page, `id="confirm"`) {
		t.Fatalf("confirmation: %d\n%s", code, page)
	}
	var ids []string
	for _, m := range hiddenID.FindAllStringSubmatch(page, -1) {
		ids = append(ids, m[1])
	}
	if !slices.Equal(ids, []string{"pi-s1", "pi-s2", "pi-s3"}) {
		t.Fatalf("confirmation carries ids %q", ids)
	}
	if after := s.snapshot(t); after != before {
		t.Fatal("revoked before the confirmation")
	}
	code, page = do("POST", "/devices/revoke", url.Values{"csrf": {csrf}, "confirm": {"yes"}, "id": ids})
	if code != 200 || !strings.Contains(page, `id="outcome">3 revoked`) || strings.Contains(page, "already revoked") {
		t.Fatalf("revoke the selection: %d\n%s", code, page)
	}
	for id, ch := range lost {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still connected after revoking it from the dashboard", id)
		}
	}
	crl := fetchCRL(t, s)
	for _, id := range ids {
		if !slices.ContainsFunc(crl.RevokedCertificateEntries, func(e x509.RevocationListEntry) bool {
			return e.SerialNumber.Cmp(devs[id].cert.SerialNumber) == 0
		}) {
			t.Errorf("the CRL does not list the certificate of %s", id)
		}
		if n := revokes(id); n != 1 {
			t.Errorf("%s: %d revocations audited, want 1", id, n)
		}
	}
	if slices.ContainsFunc(s.Broker().Online(), func(id string) bool { return id == "pi-s1" || id == "pi-s2" }) {
		t.Error("a revoked device is still listed online")
	}
	code, page = do("GET", "/devices", nil)
	if code != 200 || strings.Contains(page, `value="pi-s1" form="revoke-selected"`) || !strings.Contains(page, `value="pi-s4" form="revoke-selected"`) {
		t.Errorf("devices page offers a revoked identity, or not the others: %d", code)
	}

	// A selection with one revoked since: reported, the others revoked.
	code, page = do("POST", "/devices/revoke", url.Values{"csrf": {csrf}, "id": {"pi-s3", "pi-s4", "pi-s5"}})
	if code != 200 || !strings.Contains(page, "1 of them is already revoked") {
		t.Fatalf("confirmation with a revoked id: %d\n%s", code, page)
	}
	code, page = do("POST", "/devices/revoke", url.Values{"csrf": {csrf}, "confirm": {"yes"}, "id": {"pi-s3", "pi-s4", "pi-s5"}})
	if code != 200 || !strings.Contains(page, `id="outcome">2 revoked`) || !strings.Contains(page, "1 was already revoked") {
		t.Fatalf("revoke with a revoked id: %d\n%s", code, page)
	}
	for id, want := range map[string]int{"pi-s3": 1, "pi-s4": 1, "pi-s5": 1, "pi-s6": 0} {
		if n := revokes(id); n != want {
			t.Errorf("%s: %d revocations audited, want %d", id, n, want)
		}
	}
	if dev, err := s.Store().Device(context.Background(), "pi-s6"); err != nil || dev.Revoked() {
		t.Errorf("pi-s6, never selected: %v, revoked %v", err, dev.Revoked())
	}
}

var startAdvice = regexp.MustCompile(`--start (\d+)`)

// TestDashboardRefusedBatchOffersNextStart: a batch refused because ids
// of it have usable tokens offers the batch numbered from the first free
// number, counted as the CLI's --start advice counts it (ids of
// identities, revoked ones too, and of usable tokens; not of revoked
// tokens), and that batch can be created from the offer.
func TestDashboardRefusedBatchOffersNextStart(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.UIAddr = "127.0.0.1:0" })
	if _, errs, code := s.cli(t, "token", "create", "--prefix", "pi-b", "--count", "3"); code != 0 {
		t.Fatalf("batch: %s", errs)
	}
	s.enroll(t, s.token(t, "--device", "pi-b0007"), "pi-b0007")
	if _, errs, code := s.cli(t, "device", "revoke", "pi-b0007"); code != 0 {
		t.Fatalf("revoke: %s", errs)
	}
	s.token(t, "--device", "pi-b0009")
	toks, err := s.Store().Tokens(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range toks {
		if tok.DeviceID == "pi-b0009" {
			if _, errs, code := s.cli(t, "token", "revoke", tok.ID); code != 0 {
				t.Fatalf("token revoke: %s", errs)
			}
		}
	}
	_, errs, code := s.cli(t, "token", "create", "--prefix", "pi-b", "--count", "2")
	m := startAdvice.FindStringSubmatch(errs)
	if code == 0 || m == nil {
		t.Fatalf("the CLI gives no --start advice: exit %d: %s", code, errs)
	}
	if m[1] != "8" {
		t.Fatalf("the CLI advises --start %s, want 8 (after the revoked pi-b0007; not after the revoked token of pi-b0009)", m[1])
	}

	do := s.dashboardBrowser(t)
	hidden := regexp.MustCompile(`<input type="hidden" name="(\w+)" value="([^"]*)">`)
	confirmAndPost := func(path string) (int, string) {
		t.Helper()
		code, page := do("GET", path, nil)
		if code != 200 {
			t.Fatalf("GET %s: %d\n%s", path, code, page)
		}
		form := url.Values{}
		for _, f := range hidden.FindAllStringSubmatch(page, -1) {
			form.Set(f[1], f[2])
		}
		return do("POST", "/tokens", form)
	}
	before := s.snapshot(t)
	code, page := confirmAndPost("/tokens/new?prefix=pi-b&count=2&ttl=24h")
	if code != http.StatusConflict || !strings.Contains(page, "from "+m[1]+" (pi-b0008 … pi-b0009)") {
		t.Fatalf("refused batch: %d, no first free number %s:\n%s", code, m[1], page)
	}
	if after := s.snapshot(t); after != before {
		t.Fatal("the refused batch changed the fleet")
	}
	offer := regexp.MustCompile(`id="start-after" href="([^"]+)"`).FindStringSubmatch(page)
	if offer == nil {
		t.Fatalf("no offer of the batch from %s:\n%s", m[1], page)
	}
	code, page = confirmAndPost(strings.ReplaceAll(offer[1], "&amp;", "&"))
	if code != http.StatusCreated || !strings.Contains(page, "pi-b0008") || !strings.Contains(page, "pi-b0009") {
		t.Fatalf("the batch offered: %d\n%s", code, page)
	}
}
