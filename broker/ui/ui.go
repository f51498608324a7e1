// Package ui is fleetmq's web dashboard: fleet overview, device table,
// device pages with plots of their telemetry, tokens and the audit log,
// kept live by server-sent events. Pages are rendered on the server from
// templates embedded in the binary; a small script draws the plots as SVG
// and applies live updates. There is no build step.
//
// Who may use it follows from where it listens. On a loopback address it
// speaks plain HTTP to the local operator, who logs in with a one-time code
// from the admin socket (Login), bound to its Unix user, and answers only
// requests whose Host is a loopback name (DNS rebinding). On any other
// address it speaks HTTPS only, requires a client certificate from the
// fleet CA, and serves only identities with the operator role that are not
// revoked; there is no
// switch that relaxes this. Every state change (revoking a device, minting
// or revoking tokens) is a POST from a confirmation page, checked against
// cross-origin requests and a CSRF token bound to a SameSite=Strict cookie.
package ui

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/net/netutil"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// Store is the fleet state the dashboard reads directly.
type Store interface {
	// Device and Cert authenticate operators.
	Device(ctx context.Context, id string) (store.Device, error)
	Cert(ctx context.Context, serial string) (store.Cert, error)
	Tokens(ctx context.Context) ([]store.Token, error)
	Audit(ctx context.Context, f store.AuditFilter) ([]store.AuditEvent, error)
	Telemetry(ctx context.Context, deviceID string, since time.Time, limit int) ([]store.Message, error)
}

// Admin is the operator API the dashboard shares with the CLI
// (*admin.Handler): listing with connection state, and every change, so
// that both front ends validate, audit and take effect alike.
type Admin interface {
	DeviceInfos(ctx context.Context) ([]admin.DeviceInfo, error)
	DeviceInfo(ctx context.Context, id string) (admin.DeviceInfo, error)
	TokenInfos(ctx context.Context) ([]admin.TokenInfo, error)
	CheckTokens(req admin.TokenRequest) error
	MintTokens(ctx context.Context, req admin.TokenRequest, remote string) ([]admin.NewToken, error)
	RevokeToken(ctx context.Context, id, remote string) (store.Token, error)
	RevokeDevice(ctx context.Context, id, remote string) (admin.RevokeResult, error)
	RevokeDevices(ctx context.Context, ids []string, remote string) ([]admin.RevokeOutcome, error)
	Command(ctx context.Context, id string, req admin.CommandRequest, remote string) (admin.CommandResult, error)
	// NextFree is the first number a batch of tokens with prefix can
	// start at, as the CLI's --start advice counts it.
	NextFree(ctx context.Context, prefix string) (int, error)
}

// Config configures the dashboard. Zero values mean the defaults named.
type Config struct {
	// Addr is the listen address. Default "127.0.0.1:8080".
	Addr string
	// Store and Admin are the fleet state. Required.
	Store Store
	Admin Admin
	// Online lists the identities connected now. Required.
	Online func() []string
	// Follow streams a device's telemetry as it is stored, for live plots.
	// Optional: without it plots update on reload only.
	Follow func(id string) (<-chan store.Message, func())
	// GetCertificate and ClientCAs serve HTTPS with operator client
	// certificates; both are required to listen on a non-loopback address.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	ClientCAs      *x509.CertPool
	// ExpiryWindow is how close to expiry a certificate is shown as
	// expiring soon. Default 7 days.
	ExpiryWindow time.Duration
	// PresenceInterval is how often connection state is compared for live
	// updates, while a page listens. Default 1s.
	PresenceInterval time.Duration
	// MaxPoints is the number of newest telemetry messages plotted on a
	// device page. Default 500.
	MaxPoints int
	// MaxRows is the most rows of the device and token tables. Default 500.
	MaxRows int
	Logger  zerolog.Logger   // default zerolog.Nop()
	Now     func() time.Time // default time.Now
}

func (c *Config) setDefaults() {
	if c.Addr == "" {
		c.Addr = "127.0.0.1:8080"
	}
	if c.ExpiryWindow == 0 {
		c.ExpiryWindow = 7 * 24 * time.Hour
	}
	if c.PresenceInterval == 0 {
		c.PresenceInterval = time.Second
	}
	if c.MaxPoints == 0 {
		c.MaxPoints = 500
	}
	if c.MaxRows == 0 {
		c.MaxRows = 500
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// ErrInsecureAddr means the dashboard was asked to listen on a non-loopback
// address without what client-certificate authentication needs.
var ErrInsecureAddr = errors.New("a non-loopback dashboard address needs operator client-certificate authentication")

// Server is the dashboard.
type Server struct {
	cfg     Config
	log     zerolog.Logger
	handler http.Handler
	pages   *pages
	csrf    *csrf
	login   *localLogin
	procNet string // where the kernel lists TCP sockets (peeruid.go)
	hub     *hub

	ctx    context.Context // ends at Close: ends event streams
	cancel context.CancelFunc

	mu     sync.Mutex
	ln     net.Listener
	srv    *http.Server
	secure bool

	onces onceSet

	// streams are the open event streams of each operator, ended when
	// the operator is revoked (Revoke).
	smu     sync.Mutex
	streams map[string]map[*context.CancelFunc]bool
}

// Revoke ends the event streams of identity id at once: its requests are
// refused from now on (see operator), but a stream was authenticated
// when it opened, and would go on delivering telemetry.
func (s *Server) Revoke(id string) {
	s.smu.Lock()
	defer s.smu.Unlock()
	for cancel := range s.streams[id] {
		(*cancel)()
	}
	delete(s.streams, id)
}

// trackStream registers the stream of operator name, ended by cancel;
// the returned func unregisters it.
func (s *Server) trackStream(name string, cancel context.CancelFunc) (untrack func()) {
	s.smu.Lock()
	defer s.smu.Unlock()
	if s.streams == nil {
		s.streams = make(map[string]map[*context.CancelFunc]bool)
	}
	if s.streams[name] == nil {
		s.streams[name] = make(map[*context.CancelFunc]bool)
	}
	s.streams[name][&cancel] = true
	return func() {
		s.smu.Lock()
		defer s.smu.Unlock()
		delete(s.streams[name], &cancel)
		if len(s.streams[name]) == 0 {
			delete(s.streams, name)
		}
	}
}

// New returns the dashboard for cfg; it does not listen until Listen.
func New(cfg Config) (*Server, error) {
	if cfg.Store == nil || cfg.Admin == nil || cfg.Online == nil {
		return nil, errors.New("ui: config needs Store, Admin and Online")
	}
	if (cfg.GetCertificate == nil) != (cfg.ClientCAs == nil) {
		return nil, errors.New("ui: GetCertificate and ClientCAs go together")
	}
	cfg.setDefaults()
	p, err := loadPages()
	if err != nil {
		return nil, err
	}
	c, err := newCSRF()
	if err != nil {
		return nil, err
	}
	l, err := newLocalLogin()
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, pages: p, csrf: c, login: l, procNet: "/proc/net"}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.hub = newHub(s.ctx, cfg.Online, cfg.PresenceInterval)
	s.handler = s.routes()
	return s, nil
}

// MaxConnections is the most dashboard connections open at once; more wait
// in the listen backlog. Each browser tab holds one event stream.
const MaxConnections = 256

// MaxConnectionsPerAddr is the most connections one remote address holds
// at once on a network (HTTPS) dashboard; more are closed at once.
// Browsers speak HTTP/2 there: one connection serves every tab.
const MaxConnectionsPerAddr = 32

// Listen binds Config.Addr. On a loopback address the dashboard will speak
// plain HTTP; on any other, HTTPS with required operator certificates, or
// Listen fails with ErrInsecureAddr when the config cannot do that.
func (s *Server) Listen() error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("ui: listen on %s: %w", s.cfg.Addr, err)
	}
	tcp, _ := ln.Addr().(*net.TCPAddr)
	secure := tcp == nil || !tcp.IP.IsLoopback()
	// Sockets held open (idle, or never finishing a request) must not take
	// the process's file descriptors, which the broker needs. On the
	// network, one address holding sockets before any handshake must not
	// take every slot from the operators either.
	if secure {
		// One address as the enrollment listener counts it: an IPv6
		// host picks its addresses from its /64 at will.
		ln = enroll.LimitConnsPerAddress(ln, MaxConnectionsPerAddr)
	}
	ln = netutil.LimitListener(ln, MaxConnections)
	if secure && s.cfg.GetCertificate == nil {
		ln.Close()
		return fmt.Errorf("ui: refusing to listen on %s: %w", ln.Addr(), ErrInsecureAddr)
	}
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second, // event streams lift it
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
		ErrorLog:          newErrorLog(s.log),
	}
	if secure {
		srv.TLSConfig = &tls.Config{
			// Browsers that can hold a client certificate speak TLS 1.3.
			MinVersion:     tls.VersionTLS13,
			GetCertificate: s.cfg.GetCertificate,
			ClientAuth:     tls.RequireAndVerifyClientCert,
			ClientCAs:      s.cfg.ClientCAs,
			Time:           s.cfg.Now,
		}
	}
	s.mu.Lock()
	s.ln, s.srv, s.secure = ln, srv, secure
	s.mu.Unlock()
	return nil
}

// Serve serves until Close, then returns http.ErrServerClosed.
func (s *Server) Serve() error {
	s.mu.Lock()
	ln, srv, secure := s.ln, s.srv, s.secure
	s.mu.Unlock()
	if srv == nil {
		return errors.New("ui: Serve before Listen")
	}
	if secure {
		return srv.ServeTLS(ln, "", "")
	}
	return srv.Serve(ln)
}

// Close ends event streams and stops serving.
func (s *Server) Close() error {
	s.cancel()
	s.mu.Lock()
	srv, ln := s.srv, s.ln
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, srv.Close())
	}
	// Shutdown closes the listener only if Serve ran.
	if cerr := ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
		err = errors.Join(err, cerr)
	}
	return err
}

// Addr is the bound address (after Listen).
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// URL is the dashboard's base URL (after Listen), with the bound address.
func (s *Server) URL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return ""
	}
	scheme := "http"
	if s.secure {
		scheme = "https"
	}
	return scheme + "://" + s.ln.Addr().String() + "/"
}

// Secure reports whether the dashboard serves HTTPS with operator
// certificates (after Listen).
func (s *Server) Secure() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.secure
}

// Handler is the dashboard's HTTP handler, as Serve serves it.
func (s *Server) Handler() http.Handler { return s.handler }
