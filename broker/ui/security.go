package ui

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// viewer is who is looking at the dashboard.
type viewer struct {
	Name   string    // operator identity, or "" for the local user on loopback
	Login  string    // the local user's login cookie, on loopback
	Remote string    // the caller as the audit log names it
	Until  time.Time // end of the certificate or login that let it in
}

type viewerKey struct{}

func viewerOf(ctx context.Context) viewer {
	v, _ := ctx.Value(viewerKey{}).(viewer)
	return v
}

// guard wraps every request: security headers, then who may see the
// dashboard (an operator certificate over HTTPS, a login code's cookie
// over loopback HTTP), then, for anything but GET and HEAD, the cross-origin
// and CSRF checks.
func (s *Server) guard(next http.Handler) http.Handler {
	cop := http.NewCrossOriginProtection()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "+
			"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		if r.TLS != nil {
			// Only the HTTPS dashboard: over the loopback's plain HTTP
			// a browser ignores it (RFC 6797 section 8.1).
			h.Set("Strict-Transport-Security", enroll.StrictTransportSecurity)
		}

		var v viewer
		if r.TLS != nil || s.Secure() {
			name, err := s.operator(r)
			if err != nil {
				s.log.Info().Err(err).Str("remote", r.RemoteAddr).Msg("ui: request refused")
				s.forbidden(w, r, "This dashboard is for operators: present a current operator certificate (fleetmq operator issue NAME).")
				return
			}
			v = viewer{Name: name, Remote: "ui:" + name, Until: r.TLS.PeerCertificates[0].NotAfter}
		} else {
			if !loopbackHost(r.Host) {
				// A page of another site that resolved its name to
				// 127.0.0.1 (DNS rebinding) must not read the fleet.
				s.forbidden(w, r, "The dashboard answers only to a loopback host name (localhost, 127.0.0.1, [::1]).")
				return
			}
			v = viewer{Remote: "ui:local"}
			if r.URL.Path != "/login" && !strings.HasPrefix(r.URL.Path, "/static/") {
				login, until, ok := s.loggedIn(r)
				switch {
				case !ok && r.Method == http.MethodGet && strings.Contains(r.Header.Get("Accept"), "text/html"):
					http.Redirect(w, r, "/login", http.StatusSeeOther) // a browser: to the form
					return
				case !ok:
					s.fail(w, r, http.StatusUnauthorized, needLogin)
					return
				}
				v.Login, v.Until = login, until
			}
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if err := cop.Check(r); err != nil {
				s.forbidden(w, r, "Cross-origin request refused.")
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, maxForm)
			if err := r.ParseForm(); err != nil {
				// Not a CSRF failure: a reload would not help.
				status, msg := http.StatusBadRequest, "The form could not be read."
				if errors.As(err, new(*http.MaxBytesError)) {
					status, msg = http.StatusRequestEntityTooLarge, fmt.Sprintf("The form is too large (over %d KiB).", maxForm>>10)
				}
				s.fail(w, r, status, msg)
				return
			}
			if err := s.csrf.check(r); err != nil {
				s.log.Info().Err(err).Str("path", r.URL.Path).Str("by", v.Remote).Msg("ui: CSRF check failed")
				s.forbidden(w, r, "The form was not issued by this dashboard, or is from before a restart: reload the page and try again.")
				return
			}
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), viewerKey{}, v)))
	})
}

// maxForm bounds form bodies; the largest form is a token request.
const maxForm = 64 << 10

// operator authenticates the verified client certificate of r: its serial
// must be a certificate of its CN in the store, identical, current and not
// revoked, and the CN an operator that is not revoked.
func (s *Server) operator(r *http.Request) (string, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return "", errors.New("no verified client certificate")
	}
	leaf := r.TLS.VerifiedChains[0][0]
	if now := s.cfg.Now(); now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return "", errors.New("client certificate outside its validity period")
	}
	id := leaf.Subject.CommonName
	c, err := s.cfg.Store.Cert(r.Context(), leaf.SerialNumber.Text(16))
	if err != nil {
		return "", fmt.Errorf("client certificate of %q: %w", id, err)
	}
	if c.DeviceID != id || (len(c.DER) > 0 && !bytes.Equal(c.DER, leaf.Raw)) {
		return "", fmt.Errorf("client certificate of %q does not match the store", id)
	}
	if c.Revoked() {
		return "", fmt.Errorf("client certificate of %q: %w", id, store.ErrCertRevoked)
	}
	d, err := s.cfg.Store.Device(r.Context(), id)
	switch {
	case err != nil:
		return "", fmt.Errorf("identity %q: %w", id, err)
	case d.Revoked():
		return "", fmt.Errorf("identity %q: %w", id, store.ErrDeviceRevoked)
	case d.Role != store.RoleOperator:
		return "", fmt.Errorf("identity %q has role %s, not operator", id, d.Role)
	}
	return id, nil
}

// loopbackHost reports whether a Host header names this machine: localhost
// or a loopback IP, with or without a port.
func loopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// csrf issues and checks CSRF tokens. A browser session is a random value
// in a SameSite=Strict, HttpOnly cookie; its token, put in every form, is
// an HMAC of it under a key that never leaves the process, so a cookie
// planted by someone else is worth nothing without its token.
type csrf struct {
	key []byte
}

const (
	csrfField = "csrf"
	// The __Host- prefix keeps the cookie from being set by another
	// host or over plain HTTP; it needs Secure, so loopback HTTP uses the
	// plain name.
	cookieSecure = "__Host-fleetmq_session"
	cookiePlain  = "fleetmq_session"
)

func newCSRF() (*csrf, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("ui: csrf key: %w", err)
	}
	return &csrf{key: key}, nil
}

func cookieName(r *http.Request) string {
	if r.TLS != nil {
		return cookieSecure
	}
	return cookiePlain
}

// token returns the form token of r's session, starting a session (a new
// cookie on w) when r has none.
func (c *csrf) token(w http.ResponseWriter, r *http.Request) (string, error) {
	session := ""
	if ck, err := r.Cookie(cookieName(r)); err == nil && validSession(ck.Value) {
		session = ck.Value
	} else {
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			return "", fmt.Errorf("ui: session: %w", err)
		}
		session = base64.RawURLEncoding.EncodeToString(b)
		http.SetCookie(w, &http.Cookie{
			Name: cookieName(r), Value: session, Path: "/",
			HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode,
		})
	}
	return c.sign(session), nil
}

func validSession(v string) bool {
	b, err := base64.RawURLEncoding.DecodeString(v)
	return err == nil && len(b) == 32
}

func (c *csrf) sign(session string) string {
	m := hmac.New(sha256.New, c.key)
	m.Write([]byte("fleetmq ui csrf\x00"))
	m.Write([]byte(session))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// check verifies the form token of a state-changing request against its
// session cookie, in constant time.
func (c *csrf) check(r *http.Request) error {
	ck, err := r.Cookie(cookieName(r))
	if err != nil || !validSession(ck.Value) {
		return errors.New("no session cookie")
	}
	got := r.PostFormValue(csrfField)
	if got == "" {
		got = r.Header.Get("X-CSRF-Token")
	}
	if got == "" {
		return errors.New("no CSRF token")
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(c.sign(ck.Value))) != 1 {
		return errors.New("wrong CSRF token")
	}
	return nil
}

// newErrorLog routes net/http's messages (mostly TLS handshakes of clients
// without a certificate) to zerolog at debug level.
func newErrorLog(l zerolog.Logger) *log.Logger {
	return log.New(errorLogWriter{l}, "", 0)
}

type errorLogWriter struct{ l zerolog.Logger }

func (w errorLogWriter) Write(p []byte) (int, error) {
	w.l.Debug().Str("component", "ui-http").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}

// onceSet remembers the one-time fields of the token forms submitted, so
// that a form is acted on once (a reload of the page with the secrets
// re-posts it). Entries are forgotten after a day, by which time the
// session's pages are stale anyway; a form older than that is refused.
type onceSet struct {
	mu   sync.Mutex
	used map[string]time.Time
}

const onceTTL = 24 * time.Hour

// newOnce returns a fresh one-time field, with its issue time so that an
// old form need not be remembered to be refused.
func newOnce(now time.Time) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return strconv.FormatInt(now.Unix(), 10) + "." + base64.RawURLEncoding.EncodeToString(b)
}

// take reports whether once is fresh and not used, and marks it used.
func (o *onceSet) take(once string, now time.Time) bool {
	at, _, ok := strings.Cut(once, ".")
	sec, err := strconv.ParseInt(at, 10, 64)
	if !ok || err != nil || now.Sub(time.Unix(sec, 0)) > onceTTL {
		return false
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.used == nil {
		o.used = make(map[string]time.Time)
	}
	for k, t := range o.used {
		if now.Sub(t) > onceTTL {
			delete(o.used, k)
		}
	}
	if _, dup := o.used[once]; dup {
		return false
	}
	o.used[once] = now
	return true
}

// give forgets once: what it asked for was not done.
func (o *onceSet) give(once string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	delete(o.used, once)
}
