package agent

import (
	"errors"
	"math/rand/v2"
	"time"

	"github.com/rs/zerolog"
)

// DefaultStateDir is used when neither Config.StateDir nor $STATE_DIRECTORY is set.
const DefaultStateDir = "/var/lib/device-agent"

// Bounds of the telemetry period accepted from the `interval` command.
const (
	MinInterval = time.Second
	MaxInterval = 24 * time.Hour
)

// Config configures the agent. The zero value of every field means its default.
type Config struct {
	// StateDir holds the key, certificates, state.json and the queue.
	// Default DefaultStateDir.
	StateDir string

	// Interval is the telemetry period. Default 30s.
	Interval time.Duration

	// ProcRoot, SysRoot and DiskPath are where telemetry is read from, so
	// tests can point them at a fake tree. Defaults "/proc", "/sys" and "/".
	ProcRoot string
	SysRoot  string
	DiskPath string

	// Version is reported in telemetry as agent_version. Default "dev".
	Version string

	// QueueMaxMessages and QueueMaxBytes bound the offline queue; the oldest
	// messages are dropped beyond them. Defaults 10000 and 16 MiB.
	QueueMaxMessages int
	QueueMaxBytes    int64
	// QueueSyncInterval is how often appended, undelivered telemetry is
	// fsynced: SD cards wear, so not one fsync per message. The delivery
	// pointer is saved once a minute. Default 5s.
	QueueSyncInterval time.Duration

	// Grace is how long after expiry the server still accepts a renewal
	// signed by the expired key; beyond it the agent needs a new token. The
	// server decides; this only shapes what the agent tries. Default 7 days.
	Grace time.Duration

	// RetryMin and RetryMax bound the exponential backoff of failed
	// renewals: retry n (from 0) waits a random time in [d/2, d] with
	// d = min(RetryMin·2ⁿ, RetryMax) (see backoff). Defaults 10s and 1h.
	RetryMin time.Duration
	RetryMax time.Duration
	// BlockedRetryMin and BlockedRetryMax bound the backoff, drawn the same
	// way, while the device is revoked or needs a new token. Defaults 1h
	// and 24h.
	BlockedRetryMin time.Duration
	BlockedRetryMax time.Duration
	// RenewCommandInterval is the least time between the last renewal (or
	// accepted renew command) and a renew command that is obeyed: a backend
	// stuck in a loop must not wear the SD card or load the CA. Scheduled
	// renewals are not limited by it. Default 10m.
	RenewCommandInterval time.Duration
	// ConnectRetryMin and ConnectRetryMax bound the backoff between broker
	// connection attempts, drawn the same way. Defaults 1s and 2m.
	ConnectRetryMin time.Duration
	ConnectRetryMax time.Duration
	// ConnectStable is how long a broker session must have lasted for
	// the reconnection after it to start the backoff afresh: shorter ones
	// (a broker that drops the device at once) keep backing off. Default
	// 30s.
	ConnectStable time.Duration

	// ConnectTimeout bounds one MQTT connection attempt. Default 30s.
	ConnectTimeout time.Duration
	// PublishTimeout bounds the wait for one PUBACK. Default 30s.
	PublishTimeout time.Duration
	// KeepAlive is the MQTT keepalive. Default 60s.
	KeepAlive time.Duration
	// HTTPTimeout bounds one request to the enrollment server. Default 30s.
	HTTPTimeout time.Duration
	// RefusalWindow is how soon after dialing a connection the broker
	// closes without a word must end to count as a possible refusal of
	// the certificate (three in a row ask the server): a refusal comes
	// right after the handshake, while a link too slow for the broker's
	// handshake deadline (10 s by default) is cut later, and renewing
	// would not help it. Default 5s.
	RefusalWindow time.Duration
	// EnrollAttempts is how many times enroll tries a link that drops or
	// a busy server before it gives up. Default 4.
	EnrollAttempts int
	// EnrollRetryBase is the first wait between enroll attempts; each
	// doubles it, plus up to half of jitter. Default 2s.
	EnrollRetryBase time.Duration
	// CertCheckInterval is how often cert.pem is checked for a certificate
	// renewed by another process. Default 1m.
	CertCheckInterval time.Duration
	// StateInterval is how often queue counters are saved to state.json
	// when they changed. Default 5m.
	StateInterval time.Duration
	// ClockPollInterval is how often a clock believed wrong is checked
	// again. Default 30s.
	ClockPollInterval time.Duration
	// MaxClockSkew is how far the local clock may be from the server's Date
	// header before the agent waits for time sync. Default 5m.
	MaxClockSkew time.Duration

	// Logger receives the agent's logs. Default zerolog.Nop().
	Logger zerolog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Rand returns a float in [0, 1) for jitter. Default math/rand/v2.Float64.
	Rand func() float64
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	setDur := func(d *time.Duration, def time.Duration) {
		if *d == 0 {
			*d = def
		}
	}
	setStr := func(s *string, def string) {
		if *s == "" {
			*s = def
		}
	}
	setStr(&c.StateDir, DefaultStateDir)
	setDur(&c.Interval, 30*time.Second)
	setStr(&c.ProcRoot, "/proc")
	setStr(&c.SysRoot, "/sys")
	setStr(&c.DiskPath, "/")
	setStr(&c.Version, "dev")
	if c.QueueMaxMessages == 0 {
		c.QueueMaxMessages = 10000
	}
	if c.QueueMaxBytes == 0 {
		c.QueueMaxBytes = 16 << 20
	}
	setDur(&c.QueueSyncInterval, 5*time.Second)
	setDur(&c.Grace, 7*24*time.Hour)
	setDur(&c.RetryMin, 10*time.Second)
	setDur(&c.RetryMax, time.Hour)
	setDur(&c.BlockedRetryMin, time.Hour)
	setDur(&c.BlockedRetryMax, 24*time.Hour)
	setDur(&c.RenewCommandInterval, 10*time.Minute)
	setDur(&c.ConnectRetryMin, time.Second)
	setDur(&c.ConnectRetryMax, 2*time.Minute)
	setDur(&c.ConnectStable, 30*time.Second)
	setDur(&c.ConnectTimeout, 30*time.Second)
	setDur(&c.PublishTimeout, 30*time.Second)
	setDur(&c.KeepAlive, 60*time.Second)
	setDur(&c.HTTPTimeout, 30*time.Second)
	setDur(&c.EnrollRetryBase, 2*time.Second)
	setDur(&c.RefusalWindow, 5*time.Second)
	if c.EnrollAttempts == 0 {
		c.EnrollAttempts = 4
	}
	setDur(&c.CertCheckInterval, time.Minute)
	setDur(&c.StateInterval, 5*time.Minute)
	setDur(&c.ClockPollInterval, 30*time.Second)
	setDur(&c.MaxClockSkew, 5*time.Minute)
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Rand == nil {
		c.Rand = rand.Float64
	}
	return c
}

// validate reports a configuration that cannot work, once, up front.
func (c Config) validate() error {
	var errs []error
	if c.Interval < 0 {
		errs = append(errs, errors.New("interval must be positive"))
	}
	if c.QueueMaxMessages < 0 || c.QueueMaxBytes < 0 {
		errs = append(errs, errors.New("queue bounds must be positive"))
	}
	if c.RetryMin > c.RetryMax || c.BlockedRetryMin > c.BlockedRetryMax || c.ConnectRetryMin > c.ConnectRetryMax {
		errs = append(errs, errors.New("a retry minimum exceeds its maximum"))
	}
	return errors.Join(errs...)
}
