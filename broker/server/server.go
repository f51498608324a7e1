// Package server assembles a fleetmq node: the store, the CA, the HTTPS
// enrollment endpoint, the mTLS MQTT broker, the admin socket, the
// Prometheus endpoint and the dashboard, with one start path and one
// shutdown path.
package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/net/netutil"

	"github.com/fleetmq/fleetmq/broker"
	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/metrics"
	"github.com/fleetmq/fleetmq/broker/ui"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// Config configures a node. Zero values mean the defaults named on each
// field; cmd/fleetmq maps flags onto it one to one.
type Config struct {
	DataDir    string   // data folder, created 0700; default "./fleetmq-data"
	EnrollAddr string   // HTTPS enrollment listener; default ":8443"
	MQTTAddr   string   // MQTT over mTLS listener; default ":8883"
	Hostnames  []string // extra SANs of the server certificate (localhost, 127.0.0.1, ::1 are always in)
	CACertFile string   // operator-provided CA certificate (PEM chain, issuing CA first); default: generated CA in DataDir
	CAKeyFile  string   // its key; both or neither
	// CertLifetime is the device certificate lifetime; default 30 days.
	CertLifetime time.Duration
	// RenewGrace is how long after expiry a device may still renew;
	// default 7 days, NoLimit for none (an expired certificate never
	// renews).
	RenewGrace time.Duration
	// BrokerURL is handed to enrolling devices; default built from the host
	// name the device used and the MQTT port.
	BrokerURL string
	// ServerCertLifetime is the lifetime of the server's own TLS
	// certificate, renewed at two thirds of it; default 7 days.
	ServerCertLifetime time.Duration
	// Retention is how long telemetry is kept; default 7 days.
	Retention time.Duration
	// RetentionCount is the most messages kept per device; default
	// 100,000, NoLimit for no count cap.
	RetentionCount int
	// RetentionInterval is how often telemetry past Retention or
	// RetentionCount is deleted (old certificate records: daily, on the
	// first pass of a day); default 1 minute.
	RetentionInterval time.Duration
	// Broker holds the MQTT limits; Addr, certificates and Logger are set by the server.
	Broker broker.Config
	// Enroll holds the enrollment limits; CA, lifetimes, BrokerURL and Logger are set by the server.
	Enroll enroll.Config
	// MetricsAddr is the listener of /metrics, /healthz and /readyz
	// (plain HTTP; no metric names a device). Default none: not served
	// ("off" too); `fleetmq serve` passes 127.0.0.1:9464.
	MetricsAddr string
	// UIAddr is the dashboard's listener: plain HTTP on a loopback
	// address, otherwise HTTPS for operator certificates only. Default
	// none: not served ("off" too); `fleetmq serve` passes 127.0.0.1:8080.
	UIAddr string
	// PprofAddr is a loopback listener serving net/http/pprof, for
	// profiling a running node. Default none: not served ("off" too).
	PprofAddr string
	// EnrollReadHeaderTimeout bounds reading the headers of an enrollment
	// request (and the TLS handshake before them); default
	// Broker.HandshakeTimeout, else 10s.
	EnrollReadHeaderTimeout time.Duration
	// EnrollReadTimeout bounds reading a whole enrollment request, body
	// included: a client dribbling its body is answered 400 and cut off
	// when it runs out; default 30s, or EnrollReadHeaderTimeout + 20s if
	// longer.
	EnrollReadTimeout time.Duration
	// EnrollMaxConnections bounds the open HTTPS enrollment connections, so
	// a flood there cannot take the file descriptors devices need to reach
	// the broker; further clients wait in the listen backlog. Default 1024.
	EnrollMaxConnections int
	// EnrollMaxConnectionsPerAddress bounds the enrollment connections
	// open from one remote address (one /64 for IPv6), so that one client
	// cannot hold all of EnrollMaxConnections; further connections from it
	// are closed at once. Default 64.
	EnrollMaxConnectionsPerAddress int

	Logger zerolog.Logger   // default zerolog.Nop()
	Now    func() time.Time // default time.Now
}

// validate refuses settings that would only fail later, far from where
// they were made.
func (c *Config) validate() error {
	// The admin socket is made in the data folder only at Start, after a
	// new fleet's database and CA: a path the kernel refuses would fail
	// there with a bare "bind: invalid argument".
	sock := filepath.Join(c.DataDir, admin.SocketName)
	if n := len(sock); n > maxSocketPath {
		return fmt.Errorf("--data %s: the admin socket %s would be %d bytes long, and a Unix socket path may have at most %d: "+
			"use a shorter data folder path", c.DataDir, sock, n, maxSocketPath)
	}
	if c.BrokerURL != "" {
		if err := checkBrokerURL(c.BrokerURL); err != nil {
			return fmt.Errorf("--broker-url %q: %w", c.BrokerURL, err)
		}
	}
	if enabled(c.PprofAddr) {
		if err := checkPprofAddr(c.PprofAddr); err != nil {
			return fmt.Errorf("--pprof-addr: %w", err)
		}
	}
	return nil
}

// checkBrokerURL accepts what the device agent accepts, and a port: a URL
// the agent refuses fails every enrollment only after its token was used.
// The agent's parser is not imported: the server never links the agent.
func checkBrokerURL(s string) error {
	const want = "want mqtts://HOST:PORT (or ssl://, tls://, tcps://), the address devices reach the MQTT listener at"
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not a URL (%v); %s", err, want)
	}
	switch u.Scheme {
	case "mqtts", "ssl", "tls", "tcps":
	default:
		// Plain tcp:// or mqtt:// would send telemetry in clear.
		return fmt.Errorf("devices connect only over TLS; %s", want)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("no host; %s", want)
	}
	if n, err := strconv.Atoi(u.Port()); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("no port from 1 to 65535; %s", want)
	}
	return nil
}

func (c *Config) setDefaults() {
	if c.DataDir == "" {
		c.DataDir = "./fleetmq-data"
	}
	if c.EnrollAddr == "" {
		c.EnrollAddr = ":8443"
	}
	if c.MQTTAddr == "" {
		c.MQTTAddr = ":8883"
	}
	if c.ServerCertLifetime == 0 {
		c.ServerCertLifetime = 7 * 24 * time.Hour
	}
	if c.Retention == 0 {
		c.Retention = 7 * 24 * time.Hour
	}
	if c.RetentionCount == 0 {
		c.RetentionCount = 100_000
	}
	if c.RetentionInterval <= 0 {
		c.RetentionInterval = time.Minute
	}
	if c.EnrollReadHeaderTimeout == 0 {
		// The same slow links as MQTT's handshake (--handshake-timeout).
		c.EnrollReadHeaderTimeout = cmp.Or(c.Broker.HandshakeTimeout, 10*time.Second)
	}
	if c.EnrollReadTimeout == 0 {
		// net/http bounds the TLS handshake by the shortest of its
		// timeouts: this one must not undercut the header timeout.
		c.EnrollReadTimeout = max(30*time.Second, c.EnrollReadHeaderTimeout+20*time.Second)
	}
	if c.EnrollMaxConnections == 0 {
		c.EnrollMaxConnections = 1024
	}
	if c.EnrollMaxConnectionsPerAddress == 0 {
		c.EnrollMaxConnectionsPerAddress = 64
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// maxSocketPath is the longest Unix socket path: sun_path, less the NUL
// that Go keeps room for.
const maxSocketPath = len(syscall.RawSockaddrUnix{}.Path) - 1

// DBName is the database file inside the data folder.
const DBName = "fleetmq.db"

// metricsMaxConnections is the most metrics connections open at once; more
// wait in the listen backlog.
const metricsMaxConnections = 16

// Server is one running fleetmq node.
type Server struct {
	cfg    Config
	log    zerolog.Logger
	db     *store.DB
	ca     *enroll.CA
	enroll *enroll.Handler
	mqtt   *broker.Broker
	cert   atomic.Pointer[tls.Certificate]
	// certMu serializes renewals of cert at handshake time (see
	// getCertificate); certTried is when the last one was tried.
	certMu    sync.Mutex
	certTried time.Time

	httpSrv    *http.Server
	httpLn     net.Listener
	admin      *admin.Handler
	adminSrv   *http.Server
	adminLn    net.Listener
	metrics    *metrics.Metrics
	metricsSrv *http.Server
	metricsLn  net.Listener
	pprofSrv   *http.Server
	pprofLn    net.Listener
	ui         *ui.Server
	ready      atomic.Bool // between the end of Start and the start of Close

	ctx     context.Context // ends at Close; stops background loops
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	errc    chan error // first serve error
	closing sync.Once
	closed  chan struct{}
	err     error
}

// ConfigError is a Config that New refuses before it does anything: a
// value the operator gave that cannot work (the CLI reports it as a usage
// error).
type ConfigError struct{ Err error }

func (e *ConfigError) Error() string { return e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// New opens the data folder, the store and the CA. Nothing listens yet.
func New(cfg Config) (_ *Server, err error) {
	// Before anything is created: a refused start leaves no data folder.
	if err := cfg.validate(); err != nil {
		return nil, &ConfigError{Err: err}
	}
	cfg.setDefaults()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data folder: %w", err)
	}
	// An existing folder may have looser permissions; the CA key and the
	// database live here.
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("restrict data folder: %w", err)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, errc: make(chan error, 4), closed: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	// On any failure below, release what was opened (the store's file
	// lock above all); s, not the nil result, is what holds it.
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	// Metrics read the broker only when scraped, after Start.
	s.metrics, err = metrics.New(metrics.Config{
		Stats:   func() broker.Stats { return s.mqtt.Stats() },
		Online:  func() []string { return s.mqtt.Online() },
		Devices: func(ctx context.Context) ([]store.Device, error) { return s.db.Devices(ctx) },
		Ready:   s.readiness,
		Logger:  cfg.Logger.With().Str("component", "metrics").Logger(),
		Now:     cfg.Now,
	})
	if err != nil {
		return nil, err
	}
	if err := checkDataFolder(cfg); err != nil {
		return nil, err
	}
	s.db, err = store.Open(filepath.Join(cfg.DataDir, DBName), store.Options{Logger: cfg.Logger, OnCommit: s.metrics.ObserveCommit})
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	if s.ca, err = s.loadCA(); err != nil {
		return nil, err
	}
	if err := s.renewServerCert(); err != nil {
		return nil, err
	}

	ec := cfg.Enroll
	ec.CA, ec.CertLifetime, ec.RenewGrace, ec.BrokerURL = s.ca, cfg.CertLifetime, cfg.RenewGrace, cfg.BrokerURL
	if cfg.RenewGrace == NoLimit {
		ec.RenewGrace = enroll.NoRenewGrace
	}
	ec.Logger, ec.Now = cfg.Logger.With().Str("component", "enroll").Logger(), cfg.Now
	ec.Observe = chain(ec.Observe, s.metrics.ObserveEnroll)
	ec.OnReprovision = s.onReprovision
	from, to, restored, err := s.db.RestoredWindow(context.Background(), cfg.Now())
	if err != nil {
		return nil, err
	}
	if restored {
		ec.RestoredFrom, ec.RestoredAt = from, to
		s.log.Info().Time("snapshot", from).Time("restored", to).
			Msg("serving a restored backup: devices renewing certificates issued between the two are taken back")
	}
	if _, port, err := net.SplitHostPort(cfg.MQTTAddr); err == nil {
		ec.MQTTPort, _ = strconv.Atoi(port)
	}
	if s.enroll, err = enroll.NewHandler(ec, s.db); err != nil {
		return nil, err
	}

	bc := cfg.Broker
	bc.Addr = cfg.MQTTAddr
	bc.GetCertificate = s.getCertificate
	bc.ClientCAs = s.ca.Pool()
	bc.Logger = cfg.Logger.With().Str("component", "mqtt").Logger()
	bc.Now = cfg.Now
	if s.mqtt, err = broker.New(bc, s.db); err != nil {
		return nil, err
	}
	s.admin, err = admin.New(admin.Config{
		CA:             s.ca,
		OnRevoke:       s.onRevoke,
		Online:         s.mqtt.Online,
		Unwritten:      s.mqtt.UnwrittenPresence,
		Follow:         s.mqtt.Follow,
		Command:        s.command,
		CommandMany:    s.commandMany,
		DashboardLogin: s.dashboardLogin,
		Observe:        s.metrics.ObserveAdmin,
		Logger:         s.log.With().Str("component", "admin").Logger(),
		Now:            s.cfg.Now,
	}, s.db)
	if err != nil {
		return nil, err
	}
	if enabled(cfg.UIAddr) {
		s.ui, err = ui.New(ui.Config{
			Addr:           cfg.UIAddr,
			Store:          s.db,
			Admin:          s.admin,
			Online:         s.mqtt.Online,
			Follow:         s.mqtt.Follow,
			GetCertificate: s.getCertificate,
			ClientCAs:      s.ca.Pool(),
			Logger:         cfg.Logger.With().Str("component", "ui").Logger(),
			Now:            cfg.Now,
		})
		if err != nil {
			return nil, err
		}
	}
	return s, nil
}

// ErrDatabaseLost means the data folder held a fleet whose database is
// gone: serving it would start an empty fleet.
var ErrDatabaseLost = errors.New("the fleet's database is missing or empty")

// checkDataFolder refuses a folder in which opening the store would
// silently start a new, empty fleet where there was one. A generated CA is
// written after the database, so a folder holding ca.pem or ca.key
// without a database lost it: every device would be turned away, and its agent told
// to enroll again.
//
// A backup killed mid-copy leaves a folder holding fleetmq.db.partial:
// it is no data folder, and serving it would also start a new fleet.
func checkDataFolder(cfg Config) error {
	partial := filepath.Join(cfg.DataDir, DBName+".partial")
	if _, err := os.Lstat(partial); err == nil {
		return fmt.Errorf("%s is the unfinished copy of a fleetmq backup that was killed: %s is not a complete backup. "+
			"Serve from a complete backup or the server's own data folder; to use this folder anyway, delete %s", partial, cfg.DataDir, partial)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("data folder: %w", err)
	}
	if cfg.CACertFile != "" {
		return nil // the CA lives elsewhere: nothing here tells a new fleet from a lost one
	}
	db := filepath.Join(cfg.DataDir, DBName)
	fi, err := os.Stat(db)
	switch {
	case err == nil && fi.Size() > 0:
		return nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("open store: %w", err)
	}
	// Either file of the CA will do: a folder that kept only ca.key lost
	// its fleet too, and the store opened below would leave an empty
	// database behind for the next start to serve once ca.pem is back.
	held := false
	for _, name := range []string{"ca.pem", "ca.key"} {
		if _, err := os.Stat(filepath.Join(cfg.DataDir, name)); err == nil {
			held = true
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("load CA: %w", err)
		}
	}
	if !held {
		return nil
	}
	return fmt.Errorf("open store: %w: %s is missing or empty but %s holds the fleet's CA (ca.pem, ca.key): "+
		"put back fleetmq.db from a backup (fleetmq backup), or, to start a new fleet, move ca.pem and ca.key away",
		ErrDatabaseLost, db, cfg.DataDir)
}

// dashboardLogin is the loopback dashboard's login page and a one-time
// code for it.
func (s *Server) dashboardLogin() (string, string, error) {
	switch {
	case s.ui == nil:
		return "", "", errors.New("the dashboard is off: start fleetmq serve with --ui-addr (default 127.0.0.1:8080)")
	case s.ui.Secure():
		return "", "", fmt.Errorf("the dashboard at %s is on the network: operators log in with a certificate (fleetmq operator issue NAME)", s.ui.URL())
	}
	return s.ui.Login()
}

// NoLimit, as Config.RetentionCount, means no count cap; as
// Config.RenewGrace, no renewal after expiry. (Zero means the default.)
const NoLimit = -1

// enabled reports whether an optional listener address asks for one.
func enabled(addr string) bool { return addr != "" && addr != "off" }

// chain returns an observer calling both a and b; either may be nil.
func chain(a, b func(op, result string)) func(op, result string) {
	if a == nil {
		return b
	}
	return func(op, result string) { a(op, result); b(op, result) }
}

// readiness is /readyz: started, not closing, and the store answers.
func (s *Server) readiness(ctx context.Context) error {
	if !s.ready.Load() {
		return errors.New("starting or shutting down")
	}
	// Every TLS client refuses the node then, and it cannot renew its own
	// certificate.
	if end := s.ca.ChainEnd(); !s.cfg.Now().Before(end) {
		return fmt.Errorf("the fleet CA expired at %s: renew the CA certificate for its key (README.md: Renewing or replacing the CA)", end.UTC().Format(time.RFC3339))
	}
	// A damaged page met anywhere since start: writes are refused.
	if err := s.db.Damaged(); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	// Any read transaction proves the file is open and readable; a
	// missing id costs one B-tree lookup.
	if _, err := s.db.Device(ctx, "readyz\x00probe"); err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

// Start binds every listener (so a busy port fails here) and serves in the
// background. The MQTT port's ephemeral port, if any, is known once the
// enrollment endpoint hands out broker URLs.
func (s *Server) Start() error {
	if enabled(s.cfg.PprofAddr) {
		// First: the others' listeners would outlive a failure here.
		ln, err := listenPprof(s.cfg.PprofAddr)
		if err != nil {
			return err
		}
		s.pprofLn, s.pprofSrv = ln, s.pprofServer()
	}
	if err := s.mqtt.Start(); err != nil {
		return fmt.Errorf("start MQTT listener: %w", err)
	}
	if s.cfg.BrokerURL == "" {
		// With ":0" the real port is only known now.
		if tcp, ok := s.mqtt.Addr().(*net.TCPAddr); ok {
			s.enroll.SetMQTTPort(tcp.Port)
		}
	}
	ln, err := net.Listen("tcp", s.cfg.EnrollAddr)
	if err != nil {
		return fmt.Errorf("listen for enrollment on %s: %w", s.cfg.EnrollAddr, err)
	}
	// The per-address cap is inside the overall one: a connection it
	// closes never takes one of the overall slots.
	ln = enroll.LimitConnsPerAddress(ln, s.cfg.EnrollMaxConnectionsPerAddress)
	s.httpLn = tls.NewListener(netutil.LimitListener(ln, s.cfg.EnrollMaxConnections), s.httpsTLS())
	// WriteTimeout is longer than ReadTimeout: net/http counts the write
	// deadline from the end of the headers, so with equal timeouts a client
	// that dribbles its body until the read deadline would be cut off
	// before its error answer is written. The margin is for the handler's
	// work and the answer.
	s.httpSrv = &http.Server{
		Handler:           s.enroll,
		ReadHeaderTimeout: s.cfg.EnrollReadHeaderTimeout,
		ReadTimeout:       s.cfg.EnrollReadTimeout,
		WriteTimeout:      s.cfg.EnrollReadTimeout + 30*time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          newHTTPErrorLog(s.log),
	}
	if err := s.listenAdmin(); err != nil {
		return err
	}
	if enabled(s.cfg.MetricsAddr) {
		if s.metricsLn, err = net.Listen("tcp", s.cfg.MetricsAddr); err != nil {
			return fmt.Errorf("listen for metrics on %s: %w", s.cfg.MetricsAddr, err)
		}
		// A scraper needs one connection, kept alive: held or idle sockets
		// beyond a few must not take the descriptors the broker needs.
		s.metricsLn = netutil.LimitListener(s.metricsLn, metricsMaxConnections)
		s.metricsSrv = &http.Server{
			Handler:           s.metrics.Handler(),
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       30 * time.Second,
			WriteTimeout:      30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    64 << 10,
			ErrorLog:          newHTTPErrorLog(s.log),
		}
	}
	if s.ui != nil {
		if err := s.ui.Listen(); err != nil {
			return err
		}
		if s.ui.Secure() {
			s.warnWithoutOperators()
		}
	}
	s.serve("enroll", func() error { return s.httpSrv.Serve(s.httpLn) })
	s.serve("admin", func() error { return s.adminSrv.Serve(s.adminLn) })
	if s.metricsSrv != nil {
		s.serve("metrics", func() error { return s.metricsSrv.Serve(s.metricsLn) })
	}
	if s.pprofSrv != nil {
		s.serve("pprof", func() error { return s.pprofSrv.Serve(s.pprofLn) })
	}
	if s.ui != nil {
		s.serve("ui", s.ui.Serve)
	}
	s.warnCAExpiry()
	if !s.ca.SignsCRLs() {
		// Only a fleet served before this was refused at start gets here.
		s.log.Error().Msg("the fleet CA may not sign CRLs (key usage cRLSign missing): GET /v1/crl answers 503, so relying parties " +
			"that read the CRL do not learn of revocations (this server refuses revoked certificates all the same); " +
			"renew the CA certificate for its key with key usage keyCertSign and cRLSign (README.md: Renewing or replacing the CA)")
	}
	s.loop(s.renewServerCertLoop)
	s.loop(s.crlLoop)
	s.loop(s.retentionLoop)
	s.ready.Store(true)
	ev := s.log.Info().Str("enroll", s.httpLn.Addr().String()).Str("mqtt", s.mqtt.Addr().String()).
		Str("admin", s.AdminSocket()).Str("data", s.cfg.DataDir)
	if s.metricsLn != nil {
		ev = ev.Str("metrics", "http://"+s.metricsLn.Addr().String()+"/metrics")
	}
	if s.ui != nil {
		ev = ev.Str("ui", s.ui.URL())
	}
	if s.pprofLn != nil {
		ev = ev.Str("pprof", "http://"+s.pprofLn.Addr().String()+"/debug/pprof/")
	}
	ev.Msg("fleetmq serving")
	if s.ui != nil && !s.ui.Secure() {
		s.log.Info().Msg("dashboard login: run 'fleetmq dashboard' for a one-time code")
	}
	return nil
}

// warnWithoutOperators tells the operator of a dashboard on a network
// address how to get in, when nobody can yet.
func (s *Server) warnWithoutOperators() {
	devs, err := s.db.Devices(s.ctx)
	if err != nil {
		return
	}
	for _, d := range devs {
		if d.Role == store.RoleOperator && !d.Revoked() {
			return
		}
	}
	s.log.Warn().Str("ui", s.ui.URL()).Msg("the dashboard accepts operator certificates only and there is no operator yet: run 'fleetmq operator issue NAME'")
}

func (s *Server) listenAdmin() error {
	path := s.AdminSocket()
	// A socket left by a crashed server would make Listen fail; a live
	// server cannot be running because we hold the database lock.
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale admin socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("listen on admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("restrict admin socket: %w", err)
	}
	s.adminLn = ln
	s.adminSrv = &http.Server{Handler: s.admin, ReadHeaderTimeout: 10 * time.Second, ErrorLog: newHTTPErrorLog(s.log)}
	return nil
}

// onRevoke makes a committed revocation effective: the live sessions are
// closed (new handshakes already fail, as the store says revoked) and the
// CRL is regenerated, once for all of ids: a rebuild signs every entry.
func (s *Server) onRevoke(ctx context.Context, ids ...string) {
	for _, id := range ids {
		s.mqtt.Revoke(id)
		if s.ui != nil {
			s.ui.Revoke(id) // an operator's open dashboard streams
		}
	}
	if err := s.enroll.RefreshCRL(ctx); err != nil {
		s.log.Error().Err(err).Msg("refresh CRL after revocation")
	}
}

// command publishes an operator's command through this node's broker, and
// says in the public error table's words why it could not.
func (s *Server) command(ctx context.Context, id, name string, payload []byte, wait time.Duration) (admin.Sent, error) {
	res, err := s.mqtt.Command(ctx, id, name, payload, wait)
	if err := commandErr(id, name, res, err); err != nil {
		return admin.Sent{}, err
	}
	return admin.Sent{Topic: res.Topic, Online: res.Online, Reply: res.Reply, Gone: res.Gone}, nil
}

// commandMany is command to each of ids, in one wait. A name that cannot
// be a command for one of them refuses the whole request before anything
// is sent.
func (s *Server) commandMany(ctx context.Context, ids []string, name string, payload []byte, wait time.Duration) ([]admin.Sent, error) {
	for _, id := range ids {
		if _, ok := broker.CommandTopic(id, name); !ok {
			return nil, commandErr(id, name, broker.CommandResult{}, broker.ErrBadCommand)
		}
	}
	res, errs := s.mqtt.CommandMany(ctx, ids, name, payload, wait)
	out := make([]admin.Sent, len(ids))
	for i, r := range res {
		out[i] = admin.Sent{Topic: r.Topic, Online: r.Online, Reply: r.Reply, Gone: r.Gone, Err: commandErr(ids[i], name, r, errs[i])}
	}
	return out, nil
}

// commandErr says in the public error table's words why a command could
// not go to device id.
func commandErr(id, name string, res broker.CommandResult, err error) error {
	switch {
	case errors.Is(err, broker.ErrBadCommand):
		return &enroll.Error{Code: enroll.CodeBadRequest, Err: err, Message: fmt.Sprintf(
			"%q cannot be a command: give one or more topic levels (ping, config/set) without +, # or empty levels, at most 512 bytes of topic in all", name)}
	case errors.Is(err, broker.ErrNotListening) && res.Online:
		return &enroll.Error{Code: enroll.CodeDeviceOffline, Err: err, Message: fmt.Sprintf(
			"%s is connected but does not subscribe to %s, so nothing was sent: it takes no such command (the device agent takes ping, renew and interval)", id, res.Topic)}
	case errors.Is(err, broker.ErrNotListening):
		return &enroll.Error{Code: enroll.CodeDeviceOffline, Err: err, Message: fmt.Sprintf(
			"%s is not connected (nothing subscribes to %s); commands are not queued for a device away: send it again when `fleetmq device list --online` shows it", id, res.Topic)}
	}
	return err
}

// onReprovision closes the sessions of a re-provisioned device that use
// the certificates its re-provisioning revoked (the CRL is already
// regenerated); the device's new certificate connects as usual.
func (s *Server) onReprovision(_ context.Context, id string) {
	if s.mqtt != nil {
		s.mqtt.CloseRevokedCerts(id)
	}
}

func (s *Server) httpsTLS() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		CipherSuites:   secureSuites,
		GetCertificate: s.getCertificate,
		// Requested, not required: enrollment has no certificate yet, and
		// renewal checks it itself so that an expired one can renew within
		// the grace period.
		ClientAuth: tls.RequestClientCert,
	}
}

// secureSuites are the TLS 1.2 suites allowed: forward secret and AEAD only.
// (TLS 1.3 suites are not configurable and all qualify.)
var secureSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
}

// getCertificate returns the server certificate, renewed first if the
// clock is outside its validity. renewServerCertLoop counts on a monotonic
// timer, which a wall clock jump passes by: a gateway that starts fleetmq
// before NTP has set its clock (days behind, after a power cut) issues a
// certificate that is already expired once the clock is right, and would
// present it to every client until the timer fires days later.
func (s *Server) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := s.cert.Load()
	if now := s.cfg.Now(); now.Before(c.Leaf.NotBefore) || !now.Before(c.Leaf.NotAfter) {
		c = s.renewInvalidCert(now)
	}
	return c, nil
}

// renewInvalidCert renews the server certificate, which the clock says is
// not valid at now, at most once a minute: with an expired CA every
// attempt fails, and each handshake would otherwise log it.
func (s *Server) renewInvalidCert(now time.Time) *tls.Certificate {
	s.certMu.Lock()
	defer s.certMu.Unlock()
	c := s.cert.Load()
	valid := !now.Before(c.Leaf.NotBefore) && now.Before(c.Leaf.NotAfter)
	if valid || now.Sub(s.certTried).Abs() < time.Minute {
		return c // renewed meanwhile, or tried a moment ago
	}
	s.certTried = now
	if err := s.renewServerCert(); err != nil {
		s.log.Error().Err(err).Msg("renew the server certificate, which the clock says is not valid now")
		return c
	}
	c = s.cert.Load()
	s.log.Warn().Time("not_before", c.Leaf.NotBefore).Time("not_after", c.Leaf.NotAfter).
		Msg("server certificate renewed early: the clock moved outside the validity of the one before")
	return c
}

// loadCA loads (or, for a new fleet, generates) the CA and checks that it
// is the one that issued the fleet's certificates. Restoring a backup of a
// server that ran with --ca-cert without giving it again would otherwise
// generate a new CA, and every device would be refused.
func (s *Server) loadCA() (*enroll.CA, error) {
	ctx := context.Background()
	has, err := s.db.HasIdentities(ctx)
	if err != nil {
		return nil, err
	}
	// A store served before is bound to its CA, identities or not:
	// generating one here would only be refused by BindCA below, after
	// writing it into the data folder.
	bound, err := s.db.BoundCA(ctx)
	if err != nil {
		return nil, err
	}
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{
		Dir: s.cfg.DataDir, CertFile: s.cfg.CACertFile, KeyFile: s.cfg.CAKeyFile, Now: s.cfg.Now,
		MustExist: has || bound != "",
	})
	if errors.Is(err, enroll.ErrNoCA) {
		return nil, fmt.Errorf("load CA: %w; the database was served with a CA that its identities and tokens trust, so a new CA would lock out the whole fleet: "+
			"put back the data folder's ca.pem and ca.key (a backup of a server that ran with --ca-cert/--ca-key does not hold them), "+
			"or start with the --ca-cert and --ca-key it ran with", err)
	}
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	if bound == "" && has {
		// A store written before fleetmq recorded its CA: BindCA would
		// bind it to whatever CA this start was given, and from then on
		// refuse the right one. Its certificates tell which CA it has.
		if err := issuedAny(ctx, s.db, ca); err != nil {
			return nil, fmt.Errorf("load CA: %w; start with the CA this database was used with (--ca-cert/--ca-key, or the data folder's ca.pem and ca.key)", err)
		}
	}
	if err := s.db.BindCA(ctx, ca.KeyID()); err != nil {
		return nil, fmt.Errorf("load CA: %w; start with the CA this database was used with (--ca-cert/--ca-key, or the data folder's ca.pem and ca.key)", err)
	}
	return ca, nil
}

// issuedAny returns store.ErrCAMismatch unless ca signed the current
// certificate of at least one identity in db. One is proof enough that the
// fleet is ca's: a store from before binding may hold a few identities
// issued under another CA by mistake, which are locked out whatever CA
// the server gets. A store with no certificate to check proves nothing
// either way.
func issuedAny(ctx context.Context, db *store.DB, ca *enroll.CA) error {
	devs, err := db.Devices(ctx)
	if err != nil {
		return err
	}
	checked := 0
	for _, d := range devs {
		c, err := db.Cert(ctx, d.Serial)
		if errors.Is(err, store.ErrCertUnknown) {
			continue
		}
		if err != nil {
			return err
		}
		leaf, err := x509.ParseCertificate(c.DER)
		if err != nil {
			continue // a record without its certificate proves nothing
		}
		checked++
		if ca.Cert().CheckSignature(leaf.SignatureAlgorithm, leaf.RawTBSCertificate, leaf.Signature) == nil {
			return nil
		}
	}
	if checked == 0 {
		return nil
	}
	return fmt.Errorf("%w: the CA key %s signed none of the certificates of its %d identities", store.ErrCAMismatch, ca.KeyID(), checked)
}

func (s *Server) renewServerCert() error {
	c, err := s.ca.IssueServer(s.cfg.Hostnames, s.cfg.ServerCertLifetime)
	if err != nil {
		return err // says "issue server certificate: …" itself
	}
	s.cert.Store(&c)
	return nil
}

// renewServerCertLoop reissues the certificate both TLS listeners present,
// at two thirds of its lifetime (counted from issuance: NotBefore is
// backdated), and retries a failure after a minute. Handshakes pick the new
// one up through getCertificate.
func (s *Server) renewServerCertLoop(ctx context.Context) {
	wait := s.cfg.ServerCertLifetime * 2 / 3
	for {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := s.renewServerCert(); err != nil {
			s.log.Error().Err(err).Msg("renew server certificate")
			wait = min(time.Minute, s.cfg.ServerCertLifetime/3)
			continue
		}
		wait = s.cfg.ServerCertLifetime * 2 / 3
		s.log.Info().Time("not_after", s.cert.Load().Leaf.NotAfter).Msg("server certificate renewed")
	}
}

// crlLoop re-signs the CRL daily, far ahead of its 30-day NextUpdate, and
// repeats the warning of a CA nearing its end (Start gives the first).
func (s *Server) crlLoop(ctx context.Context) {
	t := time.NewTicker(24 * time.Hour)
	defer t.Stop()
	for {
		if err := s.enroll.RefreshCRL(ctx); err != nil && ctx.Err() == nil {
			s.log.Error().Err(err).Msg("refresh CRL")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.warnCAExpiry()
	}
}

// caWarnAhead is how long before the CA chain ends the server starts to
// warn, at the least: renewing the CA reaches devices only as they renew,
// within a certificate lifetime, and some may be offline for a while.
const caWarnAhead = 90 * 24 * time.Hour

// warnCAExpiry logs a warning while the CA chain nears its end, an error
// once it has passed. Nothing else would tell: the certificates the server
// issues just get shorter, until every device and the server's own
// certificate stop working at once.
func (s *Server) warnCAExpiry() {
	end := s.ca.ChainEnd()
	left := end.Sub(s.cfg.Now())
	switch {
	case left <= 0:
		s.log.Error().Time("ca_not_after", end).
			Msg("the fleet CA has expired: no device can connect, enroll or renew, and the server's own certificate has expired too; " +
				"renew the CA certificate for its key (README.md: Renewing or replacing the CA) and restart fleetmq")
	case left < max(caWarnAhead, 3*s.cfg.CertLifetime):
		s.log.Warn().Time("ca_not_after", end).Int("days_left", int(left/(24*time.Hour))).
			Msg("the fleet CA expires soon: every certificate the server issues ends then at the latest, and then every device and the server stop working; " +
				"renew the CA certificate for its key before then (README.md: Renewing or replacing the CA)")
	}
}

func (s *Server) retentionLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.RetentionInterval)
	defer t.Stop()
	var certsPruned time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := s.db.PruneTelemetry(ctx, s.cfg.Now().Add(-s.cfg.Retention), s.cfg.RetentionCount)
		if err != nil && ctx.Err() == nil {
			s.log.Error().Err(err).Msg("prune telemetry")
		} else if n > 0 {
			s.log.Debug().Int("deleted", n).Msg("telemetry pruned")
		}
		if now := s.cfg.Now(); now.Sub(certsPruned) >= 24*time.Hour {
			certsPruned = now
			s.pruneCerts(ctx, now)
			s.pruneTokens(ctx, now)
		}
	}
}

// certRecordKeep is how long the record of a certificate that is no longer
// an identity's current one is kept once it can no longer renew (expiry
// plus the renewal grace): long enough for `device show` and an
// investigation to find it, after which the audit log still has its serial.
const certRecordKeep = 90 * 24 * time.Hour

// pruneCerts deletes old certificate records (see store.PruneCerts).
func (s *Server) pruneCerts(ctx context.Context, now time.Time) {
	grace := max(s.cfg.RenewGrace, 0) // NoLimit: no renewal after expiry
	n, err := s.db.PruneCerts(ctx, now.Add(-grace-certRecordKeep))
	if err != nil && ctx.Err() == nil {
		s.log.Error().Err(err).Msg("prune certificate records")
	} else if n > 0 {
		s.log.Info().Int("deleted", n).Msg("old certificate records pruned")
	}
}

// tokenRecordKeep is how long the record of an expired token is kept, for
// `token list` and an investigation; the audit log keeps its creation and
// uses after that.
const tokenRecordKeep = 30 * 24 * time.Hour

// pruneTokens deletes the records of tokens long expired (see
// store.PruneTokens).
func (s *Server) pruneTokens(ctx context.Context, now time.Time) {
	n, err := s.db.PruneTokens(ctx, now.Add(-tokenRecordKeep))
	if err != nil && ctx.Err() == nil {
		s.log.Error().Err(err).Msg("prune token records")
	} else if n > 0 {
		s.log.Info().Int("deleted", n).Msg("expired token records pruned")
	}
}

func (s *Server) serve(name string, fn func() error) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := fn(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			select {
			case s.errc <- fmt.Errorf("%s listener: %w", name, err):
			default:
			}
		}
	}()
}

func (s *Server) loop(fn func(ctx context.Context)) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn(s.ctx)
	}()
}

// Run starts the server and serves until ctx ends or a listener fails, then
// shuts down. The first error wins.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Start(); err != nil {
		return errors.Join(err, s.Close())
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-s.errc:
	}
	s.log.Info().Msg("fleetmq shutting down")
	if cerr := s.Close(); err == nil {
		err = cerr
	}
	return err
}

// Close shuts everything down in reverse order of start. It is idempotent.
func (s *Server) Close() error {
	s.closing.Do(func() {
		var errs []error
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.ready.Store(false)
		if s.ui != nil {
			// Its event streams follow the broker: it goes first.
			errs = append(errs, s.ui.Close())
		}
		if s.metricsSrv != nil {
			errs = append(errs, s.metricsSrv.Shutdown(shut))
			// Shutdown closes only listeners Serve had taken; Start may
			// have failed before.
			if err := s.metricsLn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, err)
			}
		}
		if s.pprofSrv != nil {
			// A CPU profile in progress would hold Shutdown for its length.
			errs = append(errs, s.pprofSrv.Close())
		} else if s.pprofLn != nil {
			errs = append(errs, s.pprofLn.Close())
		}
		if s.httpSrv != nil {
			errs = append(errs, s.httpSrv.Shutdown(shut))
		}
		if s.adminSrv != nil {
			// Followers of telemetry never end by themselves.
			errs = append(errs, s.adminSrv.Close())
		}
		if s.mqtt != nil {
			errs = append(errs, s.mqtt.Close())
		}
		s.cancel()
		s.wg.Wait()
		if s.db != nil {
			errs = append(errs, s.db.Close())
		}
		s.err = errors.Join(errs...)
		close(s.closed)
	})
	<-s.closed
	return s.err
}

// EnrollAddr is the bound enrollment address (after Start).
func (s *Server) EnrollAddr() net.Addr { return s.httpLn.Addr() }

// MQTTAddr is the bound MQTT address (after Start).
func (s *Server) MQTTAddr() net.Addr { return s.mqtt.Addr() }

// AdminSocket is the path of the admin socket.
func (s *Server) AdminSocket() string { return filepath.Join(s.cfg.DataDir, admin.SocketName) }

// PprofAddr is the bound pprof address, or nil when not served.
func (s *Server) PprofAddr() net.Addr {
	if s.pprofLn == nil {
		return nil
	}
	return s.pprofLn.Addr()
}

// MetricsAddr is the bound metrics address, or nil when not served.
func (s *Server) MetricsAddr() net.Addr {
	if s.metricsLn == nil {
		return nil
	}
	return s.metricsLn.Addr()
}

// UIURL is the dashboard's base URL, or "" when not served.
func (s *Server) UIURL() string {
	if s.ui == nil {
		return ""
	}
	return s.ui.URL()
}

// CA is the fleet CA.
func (s *Server) CA() *enroll.CA { return s.ca }

// Store is the node's store, for tests and tools in the same process.
func (s *Server) Store() *store.DB { return s.db }

// Broker is the node's MQTT broker.
func (s *Server) Broker() *broker.Broker { return s.mqtt }
