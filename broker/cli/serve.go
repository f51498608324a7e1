package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/broker/server"
)

func serve(ctx context.Context, args []string, env Env) error {
	fs := newFlags("serve", env)
	var cfg server.Config
	fs.StringVar(&cfg.EnrollAddr, "enroll-addr", ":8443", "HTTPS enrollment listen address")
	fs.StringVar(&cfg.MQTTAddr, "mqtt-addr", ":8883", "MQTT (mTLS only) listen address")
	fs.Var(listValue{&cfg.Hostnames}, "hostname", "DNS name or IP devices use to reach this server (repeatable; localhost, 127.0.0.1 and ::1 are always included, unless the CA's name constraints exclude them)")
	fs.StringVar(&cfg.CACertFile, "ca-cert", "", "operator-provided CA certificate PEM (issuing CA first, then its chain); default: a CA generated in the data folder")
	fs.StringVar(&cfg.CAKeyFile, "ca-key", "", "key of --ca-cert (PEM, mode 0600)")
	cfg.CertLifetime = 30 * 24 * 3600e9
	fs.Var(durationValue{&cfg.CertLifetime}, "cert-lifetime", "device certificate lifetime")
	cfg.RenewGrace = 7 * 24 * 3600e9
	fs.Var(durationValue{&cfg.RenewGrace}, "renew-grace", "how long after expiry a device may still renew; 0: never")
	fs.StringVar(&cfg.BrokerURL, "broker-url", "", "broker URL given to devices, mqtts://HOST:PORT (default: mqtts://<host they used>:<mqtt port>)")
	cfg.Retention = 7 * 24 * 3600e9
	fs.Var(durationValue{&cfg.Retention}, "retention", "how long telemetry is kept")
	fs.IntVar(&cfg.RetentionCount, "retention-count", 100_000, "most telemetry messages kept per device; 0: no cap")
	fs.IntVar(&cfg.Broker.MaxConnections, "max-connections", 10_000, "most concurrent MQTT connections")
	fs.IntVar(&cfg.Broker.MaxPendingPerAddress, "max-pending-per-address", 256, "most MQTT sockets one address (IPv6: one /64) may hold before their CONNECT is accepted (TLS handshake, waiting for CONNECT); more are closed at once and the device retries. "+
		"Keeps one host from holding every --max-connections slot; connected devices do not count. Thousands of devices behind one NAT reconnecting at once are slowed by it: raise it (e.g. to 1000) for them")
	fs.Var(durationValue{&cfg.Broker.HandshakeTimeout}, "handshake-timeout", "deadline for the TLS handshake and the MQTT CONNECT, and for the TLS handshake and headers of an enrollment request; raise it for very slow links (default 10s)")
	fs.Var(durationValue{&cfg.Broker.WriteTimeout}, "write-timeout", "longest a write to an MQTT client may block before it is disconnected (default 10s)")
	maxPacket := fs.Uint("max-packet-size", 256<<10, "largest MQTT packet accepted, bytes")
	fs.Float64Var(&cfg.Broker.PublishRate, "publish-rate", 100, "publish rate limit of each identity, devices and services alike, messages per second")
	fs.IntVar(&cfg.Broker.PublishBurst, "publish-burst", 200, "publish burst of each identity")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", "127.0.0.1:9464", "Prometheus /metrics, /healthz and /readyz listen address (plain HTTP); \"off\" or empty disables")
	fs.StringVar(&cfg.UIAddr, "ui-addr", "127.0.0.1:8080", "dashboard listen address: plain HTTP on loopback, otherwise HTTPS for operator certificates only; \"off\" or empty disables")
	fs.StringVar(&cfg.PprofAddr, "pprof-addr", "", "loopback address serving net/http/pprof for profiling (e.g. 127.0.0.1:6060); default off")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	logFormat := fs.String("log-format", "auto", "json, console, or auto (console on a terminal)")
	if err := fs.parse(args, 0); err != nil {
		return err
	}
	// A zero would silently become the default (Config's zero values):
	// given on the command line it is refused, or means none where none
	// makes sense.
	for name, bad := range map[string]bool{
		"cert-lifetime":           cfg.CertLifetime <= 0,
		"retention":               cfg.Retention <= 0,
		"max-connections":         cfg.Broker.MaxConnections <= 0,
		"max-pending-per-address": cfg.Broker.MaxPendingPerAddress <= 0,
		"handshake-timeout":       cfg.Broker.HandshakeTimeout <= 0,
		"write-timeout":           cfg.Broker.WriteTimeout <= 0,
		"max-packet-size":         *maxPacket == 0,
		"publish-rate":            cfg.Broker.PublishRate <= 0,
		"publish-burst":           cfg.Broker.PublishBurst <= 0,
	} {
		if bad && fs.given(name) {
			return usagef("--%s must be more than 0", name)
		}
	}
	switch {
	case cfg.RetentionCount < 0:
		return usagef("--retention-count must be 0 (no cap) or more")
	case cfg.RetentionCount == 0:
		cfg.RetentionCount = server.NoLimit
	}
	if fs.given("renew-grace") && cfg.RenewGrace == 0 {
		cfg.RenewGrace = server.NoLimit // no renewal after expiry
	}
	cfg.DataDir = *fs.data
	cfg.Broker.MaxPacketSize = uint32(*maxPacket)
	log, err := newLogger(env.Stderr, *logLevel, *logFormat, env.Getenv("NO_COLOR") != "")
	if err != nil {
		return usagef("%v", err)
	}
	cfg.Logger = log
	srv, err := server.New(cfg)
	if ce := (*server.ConfigError)(nil); errors.As(err, &ce) {
		return usagef("%v", ce) // a flag's value, like the checks above: exit 2
	}
	if err != nil {
		return err
	}
	return srv.Run(ctx)
}

// newLogger colours console output only on a terminal: escape codes in a
// file or the journal make the log unreadable to grep. NO_COLOR
// (no-color.org) turns colour off on a terminal too.
func newLogger(w io.Writer, level, format string, noColor bool) (zerolog.Logger, error) {
	f, ok := w.(*os.File)
	tty := ok && isatty.IsTerminal(f.Fd())
	lvl, err := zerolog.ParseLevel(strings.ToLower(level))
	if err != nil || lvl == zerolog.NoLevel {
		return zerolog.Logger{}, fmt.Errorf("unknown log level %q: use debug, info, warn or error", level)
	}
	switch format {
	case "json":
	case "console":
		w = zerolog.ConsoleWriter{Out: w, NoColor: noColor || !tty}
	case "auto":
		if tty {
			w = zerolog.ConsoleWriter{Out: w, NoColor: noColor}
		}
	default:
		return zerolog.Logger{}, fmt.Errorf("unknown log format %q: use json, console or auto", format)
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}
