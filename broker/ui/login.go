package ui

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The loopback dashboard is for whoever may run the operator CLI, not for
// every account and process that can open a socket to 127.0.0.1: it mints
// tokens and revokes devices. Its way in is a one-time link that only the
// admin socket (0600, in the data folder) hands out (`fleetmq dashboard`);
// opening it sets a login cookie, an HMAC of its expiry under a key that
// never leaves the process (a restart logs everyone out).

const (
	cookieLogin = "fleetmq_login"
	// loginCodeTTL is how long a login link works, once.
	loginCodeTTL = 5 * time.Minute
	// LoginTTL is how long a browser stays logged in to the loopback
	// dashboard; its event streams end then.
	LoginTTL = 12 * time.Hour
	// maxLoginCodes bounds the links waiting to be used.
	maxLoginCodes = 64
)

// ErrNoLocalLogin means the dashboard does not take login links: it is
// off, or on a network address, where operators present certificates.
var ErrNoLocalLogin = errors.New("the dashboard takes login links only on a loopback address")

// localLogin holds the login links handed out and not yet used.
type localLogin struct {
	key []byte

	mu    sync.Mutex
	codes map[string]time.Time // code → expiry
}

func newLocalLogin() (*localLogin, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("ui: login key: %w", err)
	}
	return &localLogin{key: key, codes: make(map[string]time.Time)}, nil
}

// LoginURL returns a one-time link that logs a browser in to the loopback
// dashboard, valid for five minutes. It is for the admin API, whose socket
// only the operator can open.
func (s *Server) LoginURL() (string, error) {
	base := s.URL()
	if base == "" || s.Secure() {
		return "", ErrNoLocalLogin
	}
	code, err := s.login.issue(s.cfg.Now())
	if err != nil {
		return "", err
	}
	return base + "login?code=" + code, nil
}

func (l *localLogin) issue(now time.Time) (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("ui: login code: %w", err)
	}
	code := base64.RawURLEncoding.EncodeToString(b)
	l.mu.Lock()
	defer l.mu.Unlock()
	for c, exp := range l.codes {
		if !now.Before(exp) {
			delete(l.codes, c)
		}
	}
	if len(l.codes) >= maxLoginCodes {
		return "", errors.New("ui: too many login links waiting to be used; try again in a few minutes")
	}
	l.codes[code] = now.Add(loginCodeTTL)
	return code, nil
}

// take reports whether code is a link handed out, unused and current,
// and uses it up.
func (l *localLogin) take(code string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	exp, ok := l.codes[code]
	delete(l.codes, code)
	return ok && now.Before(exp)
}

// cookie returns a login cookie value valid until until.
func (l *localLogin) cookie(until time.Time) string {
	exp := strconv.FormatInt(until.Unix(), 10)
	return exp + "." + l.sign(exp)
}

func (l *localLogin) sign(exp string) string {
	m := hmac.New(sha256.New, l.key)
	m.Write([]byte("fleetmq ui login\x00"))
	m.Write([]byte(exp))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// valid returns the expiry of a current login cookie value.
func (l *localLogin) valid(v string, now time.Time) (time.Time, bool) {
	exp, mac, ok := strings.Cut(v, ".")
	sec, err := strconv.ParseInt(exp, 10, 64)
	if !ok || err != nil || subtle.ConstantTimeCompare([]byte(mac), []byte(l.sign(exp))) != 1 {
		return time.Time{}, false
	}
	until := time.Unix(sec, 0)
	return until, now.Before(until)
}

// loggedIn returns the end of r's login to the loopback dashboard.
func (s *Server) loggedIn(r *http.Request) (time.Time, bool) {
	ck, err := r.Cookie(cookieLogin)
	if err != nil {
		return time.Time{}, false
	}
	return s.login.valid(ck.Value, s.cfg.Now())
}

// needLogin is the answer to a loopback request without a login.
const needLogin = "Log in first: on the machine running fleetmq, run `fleetmq dashboard` (as the user that runs it, with its --data) and open the link it prints. Links work once, for 5 minutes; a login lasts 12 hours or until fleetmq restarts."

// serveLogin uses up a login link and sets the login cookie. The page it
// answers moves on to the overview by itself: a navigation from the
// dashboard's own page carries the SameSite=Strict cookie, where a
// redirect answering a link opened from elsewhere might not.
func (s *Server) serveLogin(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		s.fail(w, r, http.StatusMethodNotAllowed, "Open the login link in the browser.")
		return
	}
	now := s.cfg.Now()
	if !s.login.take(r.URL.Query().Get("code"), now) {
		s.log.Info().Str("remote", r.RemoteAddr).Msg("ui: login link refused (used, expired or unknown)")
		s.fail(w, r, http.StatusForbidden, "This login link is used up, expired or unknown. "+needLogin)
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: cookieLogin, Value: s.login.cookie(now.Add(LoginTTL)), Path: "/",
		MaxAge: int(LoginTTL / time.Second), HttpOnly: true, SameSite: http.SameSiteStrictMode,
	})
	s.log.Info().Str("remote", r.RemoteAddr).Msg("ui: local login")
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprint(w, `<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/"><title>fleetmq</title><p>Logged in. <a href="/">Open the dashboard</a>.`)
}
