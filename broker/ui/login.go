package ui

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"html"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The loopback dashboard is for whoever may run the operator CLI, not for
// every account and process that can open a socket to 127.0.0.1: it mints
// tokens and revokes devices. Its way in is a one-time code that only the
// admin socket (0600, in the data folder) hands out (`fleetmq dashboard`),
// entered in the form at /login: never in a URL, where a browser's or
// xdg-open's command line would show it to every local user. The form sets
// a login cookie, an HMAC of its expiry and of the Unix user whose process
// sent the form (peeruid.go), under a key that never leaves the process (a
// restart logs everyone out); a request with it from another user's
// process is refused.

const (
	cookieLogin = "fleetmq_login"
	// loginCodeTTL is how long a login code works, once.
	loginCodeTTL = 5 * time.Minute
	// LoginTTL is how long a browser stays logged in to the loopback
	// dashboard; its event streams end then.
	LoginTTL = 12 * time.Hour
	// maxLoginCodes bounds the codes waiting to be used.
	maxLoginCodes = 64
)

// ErrNoLocalLogin means the dashboard does not take login codes: it is
// off, or on a network address, where operators present certificates.
var ErrNoLocalLogin = errors.New("the dashboard takes login codes only on a loopback address")

// localLogin holds the login codes handed out and not yet used, and the
// logins ended before their time.
type localLogin struct {
	key []byte

	mu    sync.Mutex
	codes map[string]time.Time // code → expiry
	// out are the login cookies logged out, until they would have
	// expired: a copy of one (another local user who got it, a browser
	// profile backed up) is refused like the browser that logged out.
	out map[string]time.Time
}

func newLocalLogin() (*localLogin, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("ui: login key: %w", err)
	}
	return &localLogin{key: key, codes: make(map[string]time.Time), out: make(map[string]time.Time)}, nil
}

// logout ends the login of cookie value v, valid until until.
func (l *localLogin) logout(v string, until, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, exp := range l.out {
		if !now.Before(exp) {
			delete(l.out, k)
		}
	}
	l.out[v] = until
}

func (l *localLogin) loggedOut(v string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, out := l.out[v]
	return out
}

// Login returns the login page's URL and a one-time code to enter there,
// valid for five minutes. It is for the admin API, whose socket only the
// operator can open.
func (s *Server) Login() (loginURL, code string, err error) {
	base := s.URL()
	if base == "" || s.Secure() {
		return "", "", ErrNoLocalLogin
	}
	code, err = s.login.issue(s.cfg.Now())
	if err != nil {
		return "", "", err
	}
	return base + "login", code, nil
}

func (l *localLogin) issue(now time.Time) (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("ui: login code: %w", err)
	}
	code := base64.RawURLEncoding.EncodeToString(b) // 22 characters, 128 bits
	l.mu.Lock()
	defer l.mu.Unlock()
	for c, exp := range l.codes {
		if !now.Before(exp) {
			delete(l.codes, c)
		}
	}
	if len(l.codes) >= maxLoginCodes {
		return "", errors.New("ui: too many login codes waiting to be used; try again in a few minutes")
	}
	l.codes[code] = now.Add(loginCodeTTL)
	return code, nil
}

// take reports whether code was handed out, unused and current, and uses
// it up.
func (l *localLogin) take(code string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	exp, ok := l.codes[code]
	delete(l.codes, code)
	return ok && now.Before(exp)
}

// cookie returns a login cookie value for user uid, valid until until.
// Each login's cookie differs (a random part), so that logging out ends
// that login only, not one made again within the second.
func (l *localLogin) cookie(until time.Time, uid uint32) string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	v := strconv.FormatInt(until.Unix(), 10) + "." + strconv.FormatUint(uint64(uid), 10) + "." + base64.RawURLEncoding.EncodeToString(b)
	return v + "." + l.sign(v)
}

func (l *localLogin) sign(v string) string {
	m := hmac.New(sha256.New, l.key)
	m.Write([]byte("fleetmq ui login\x00"))
	m.Write([]byte(v))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// valid returns the expiry of a current login cookie value of user uid.
func (l *localLogin) valid(v string, uid uint32, now time.Time) (time.Time, bool) {
	i := strings.LastIndexByte(v, '.')
	if i < 0 || subtle.ConstantTimeCompare([]byte(v[i+1:]), []byte(l.sign(v[:i]))) != 1 {
		return time.Time{}, false
	}
	parts := strings.Split(v[:i], ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	sec, err1 := strconv.ParseInt(parts[0], 10, 64)
	owner, err2 := strconv.ParseUint(parts[1], 10, 32)
	if err1 != nil || err2 != nil || uint32(owner) != uid || l.loggedOut(v) {
		return time.Time{}, false
	}
	until := time.Unix(sec, 0)
	return until, now.Before(until)
}

// requestUID is the Unix user whose process opened r's connection.
func (s *Server) requestUID(r *http.Request) (uint32, error) {
	local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if local == nil {
		return 0, fmt.Errorf("%w: no server address", errPeerUnknown)
	}
	return peerUID(s.procNet, r.RemoteAddr, local.String())
}

// loggedIn returns r's login to the loopback dashboard, its cookie's
// value, and its end: a current cookie of the user whose process sent r.
func (s *Server) loggedIn(r *http.Request) (string, time.Time, bool) {
	ck, err := r.Cookie(cookieLogin)
	if err != nil {
		return "", time.Time{}, false
	}
	uid, err := s.requestUID(r)
	if err != nil {
		s.log.Warn().Err(err).Msg("ui: request refused")
		return "", time.Time{}, false
	}
	until, ok := s.login.valid(ck.Value, uid, s.cfg.Now())
	return ck.Value, until, ok
}

// loginStream is the key of the event streams of a login (trackStream),
// beside the names of operators, which have no colon.
func loginStream(cookie string) string { return "login:" + cookie }

// serveLogout ends the browser's login to the loopback dashboard (a POST,
// which the guard has checked for cross-origin requests and its CSRF
// token): its cookie is cleared, refused from now on wherever it was
// copied, and its pages' event streams end.
func (s *Server) serveLogout(w http.ResponseWriter, r *http.Request) {
	v := viewerOf(r.Context())
	if v.Login == "" {
		// Operators on the network present certificates: there is
		// nothing to log out of.
		s.fail(w, r, http.StatusNotFound, "No such page.")
		return
	}
	s.login.logout(v.Login, v.Until, s.cfg.Now())
	s.Revoke(loginStream(v.Login))
	http.SetCookie(w, &http.Cookie{Name: cookieLogin, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	s.log.Info().Str("remote", r.RemoteAddr).Msg("ui: local logout")
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

// needLogin is the answer to a loopback request without a login.
const needLogin = "Log in first: on the machine running fleetmq, run `fleetmq dashboard` (as the user that runs it, with its --data) and enter the code it prints at /login. Codes work once, for 5 minutes; a login lasts 12 hours, for this Unix user's programs only, or until fleetmq restarts."

// loginForm is the login page: a code field and the form's CSRF token.
const loginForm = `<!doctype html><meta charset="utf-8"><title>fleetmq — log in</title>
<link rel="stylesheet" href="/static/app.css">
<main><h1>fleetmq</h1>
<p>%s</p>
<form method="post" action="/login">
<input type="hidden" name="csrf" value="%s">
<label>Code from <code>fleetmq dashboard</code> <input name="code" autocomplete="off" autofocus required></label>
<button type="submit">Log in</button>
</form></main>`

// codeSpans escapes msg for HTML and shows its `backquoted` commands as
// code: the same messages are plain text elsewhere, where the backquotes
// read right, but on the login page they showed literally.
func codeSpans(msg string) string {
	parts := strings.Split(html.EscapeString(msg), "`")
	if len(parts)%2 == 0 {
		// An unpaired backquote: leave it as it is.
		return strings.Join(parts, "`")
	}
	var b strings.Builder
	for i, p := range parts {
		if i%2 == 1 {
			b.WriteString("<code>" + p + "</code>")
		} else {
			b.WriteString(p)
		}
	}
	return b.String()
}

// serveLogin shows the login form (GET) or takes its code (POST, which the
// guard has checked for cross-origin requests and its CSRF token): a
// current code sets the login cookie for the user whose process sent it.
func (s *Server) serveLogin(w http.ResponseWriter, r *http.Request) {
	if r.TLS != nil || s.Secure() {
		// Operators on the network present certificates.
		s.fail(w, r, http.StatusNotFound, "No such page.")
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	form := func(status int, msg string) {
		tok, err := s.csrf.token(w, r)
		if err != nil {
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(status)
		fmt.Fprintf(w, loginForm, codeSpans(msg), html.EscapeString(tok))
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		form(http.StatusOK, "Run `fleetmq dashboard` on the machine running fleetmq and enter the code it prints.")
		return
	case http.MethodPost:
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		s.fail(w, r, http.StatusMethodNotAllowed, "Open /login in the browser.")
		return
	}
	uid, err := s.requestUID(r)
	if err != nil {
		s.log.Warn().Err(err).Msg("ui: login refused")
		s.fail(w, r, http.StatusForbidden, "Cannot tell which user is connecting; use the HTTPS dashboard with an operator certificate.")
		return
	}
	now := s.cfg.Now()
	if !s.login.take(strings.TrimSpace(r.PostFormValue("code")), now) {
		s.log.Info().Str("remote", r.RemoteAddr).Msg("ui: login code refused (used, expired or unknown)")
		form(http.StatusForbidden, "That code is used up, expired or unknown: run `fleetmq dashboard` for a new one.")
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: cookieLogin, Value: s.login.cookie(now.Add(LoginTTL), uid), Path: "/",
		MaxAge: int(LoginTTL / time.Second), HttpOnly: true, SameSite: http.SameSiteStrictMode,
	})
	s.log.Info().Str("remote", r.RemoteAddr).Uint32("uid", uid).Msg("ui: local login")
	http.Redirect(w, r, "/", http.StatusSeeOther)
}
