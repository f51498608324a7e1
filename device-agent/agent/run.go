package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"
)

// runner is one `device-agent run`: four loops (sampling, maintenance,
// renewal, connection) sharing the current identity.
type runner struct {
	cfg Config
	log zerolog.Logger
	dir string
	ss  *stateStore
	// runLock is held from startRunner to the end of run.
	runLock *flock
	q       *queue
	samp    sampler

	renewNow  chan struct{} // renewal requested by a command
	renewHint chan string   // the broker refused the certificate of this serial: check with the server
	sessions  atomic.Uint64 // MQTT sessions the broker accepted
	// savedPending is the queue's pending count as state.json last got it.
	savedPending   atomic.Int64
	intervalCh     chan time.Duration // new telemetry period
	pausedSampling atomic.Bool        // the pause of sampling was logged
	// queueProblem is why the on-disk queue could not be opened (telemetry
	// is then held in memory); empty when it opened. Set before the loops.
	queueProblem string

	mu           sync.Mutex
	id           *identity
	brokerURL    string
	changed      chan struct{} // closed and replaced when the identity changes
	certStamp    fileStamp
	blockedUntil time.Time // revoked or needs a token: no connection attempts before
	condition    string
	clock        *clockRef // server time seen with a skewed local clock
	lastRenewal  time.Time // by this process or another; zero if never
	lastRenewCmd time.Time // last renew command obeyed
}

// fileStamp identifies a version of a file cheaply.
type fileStamp struct {
	mod   int64 // UnixNano
	size  int64
	inode uint64 // a rename puts a new inode in place
}

func stampOf(path string) fileStamp {
	st, err := os.Stat(path)
	if err != nil {
		return fileStamp{}
	}
	fs := fileStamp{mod: st.ModTime().UnixNano(), size: st.Size()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		fs.inode = uint64(sys.Ino)
	}
	return fs
}

// clockRef is the server's time as seen once, plus a monotonic reading of
// when: it tells whether the local wall clock was fixed since, without
// asking the server again.
type clockRef struct {
	server time.Time
	at     time.Time // time.Now(), carries the monotonic clock
}

// Run runs the agent until ctx is done: it publishes telemetry through the
// offline queue, answers commands and renews the certificate.
func Run(ctx context.Context, cfg Config) error {
	a, err := startRunner(ctx, cfg)
	if err != nil {
		return err
	}
	return a.run(ctx)
}

// startRunner takes the run lock and loads everything the loops need, so
// that a broken state folder is an error before anything starts.
func startRunner(ctx context.Context, cfg Config) (_ *runner, err error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	dir := cfg.StateDir
	// Not created here: an empty folder would only hide the real problem.
	if err := requireStateDir(dir); err != nil {
		return nil, err
	}
	if err := checkStateOwner(dir, "run", os.Geteuid()); err != nil {
		return nil, err
	}
	rl, err := tryLock(filepath.Join(dir, runLock))
	if errors.Is(err, errLocked) {
		return nil, ErrAgentRunning
	}
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = rl.unlock()
		}
	}()
	removeTemps(dir)

	a := &runner{
		cfg:        cfg,
		log:        cfg.Logger,
		dir:        dir,
		runLock:    rl,
		ss:         &stateStore{dir: dir},
		samp:       sampler{procRoot: cfg.ProcRoot, sysRoot: cfg.SysRoot, diskPath: cfg.DiskPath, version: cfg.Version},
		renewNow:   make(chan struct{}, 1),
		renewHint:  make(chan string, 1),
		intervalCh: make(chan time.Duration, 1),
		changed:    make(chan struct{}),
	}
	id, err := a.loadFromDisk(ctx)
	if err != nil {
		return nil, err
	}
	st, err := readState(dir)
	if errors.Is(err, ErrNotEnrolled) {
		// The identity is there, so this is not a fresh device.
		return nil, errStateMissing
	}
	if err != nil {
		return nil, err
	}
	if err := st.checkURLs(dir); err != nil {
		return nil, err
	}
	// An empty id is a state.json written back by hand, as the advice for a
	// lost one says: run refills it, nothing disagrees.
	if st.DeviceID != "" && st.DeviceID != id.deviceID {
		a.log.Warn().Str("state", st.DeviceID).Str("certificate", id.deviceID).Msg("state.json and certificate disagree on the device id; using the certificate's")
	}
	id.received = receivedAt(st, id)
	a.setIdentity(id, st.BrokerURL)
	a.lastRenewal = st.LastRenewal
	qopts := QueueOptions{
		MaxMessages: cfg.QueueMaxMessages,
		MaxBytes:    cfg.QueueMaxBytes,
		Logger:      cfg.Logger,
		Now:         cfg.Now,
	}
	qdir := filepath.Join(dir, queueDir)
	a.q, err = openQueue(qdir, qopts)
	switch {
	case errors.Is(err, syscall.EROFS):
		// The device still works and the identity is readable: going
		// silent until someone repairs the card helps no one.
		a.log.Error().Err(err).Msg("the state folder is on a read-only file system (an SD card the kernel remounted read-only " +
			"after I/O errors?): telemetry is held in memory, the messages queued on disk wait for a start that can write, " +
			"and a renewed certificate cannot be saved; check the card (dmesg, fsck) and reboot")
		a.q = newMemoryQueue(qopts)
	case err != nil:
		// Any other damage to the queue (a file where its folder should be,
		// a folder or an unreadable file among its segments, as fsck can
		// leave them) would otherwise stop run at every start: the device
		// would go silent over what is only its backlog.
		a.queueProblem = queueProblem(qdir, err)
		a.log.Error().Err(err).Msg(a.queueProblem)
		a.q = newMemoryQueue(qopts)
	}
	return a, nil
}

// queueProblem is the advice for an offline queue run cannot open.
func queueProblem(qdir string, err error) string {
	return fmt.Sprintf("the offline queue %s cannot be opened (%v): telemetry is held in memory and lost if the agent stops "+
		"while the broker is unreachable; move the queue aside (mv %s %s.broken) and restart the agent, which starts an empty one",
		qdir, err, qdir, qdir)
}

// run runs the loops until ctx is done, then closes the queue and the lock.
func (a *runner) run(ctx context.Context) error {
	defer a.runLock.unlock()
	id, broker, _ := a.current()
	a.saveState(ctx, func(s *State) {
		s.DeviceID = id.deviceID // the certificate's, which the agent uses
		s.PID = os.Getpid()
		s.AgentVersion = a.cfg.Version
		s.Connected = false
		s.Condition = "" // found again if it still holds
		s.QueueProblem = a.queueProblem
	})
	a.log.Info().Str("device_id", id.deviceID).Str("broker", broker).Time("not_after", id.leaf.NotAfter).
		Stringer("interval", a.cfg.Interval).Str("version", a.cfg.Version).Msg("agent started")

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.sampleLoop(gctx) })
	g.Go(func() error { return a.maintainLoop(gctx) })
	g.Go(func() error { return a.renewLoop(gctx) })
	g.Go(func() error { return a.connectLoop(gctx) })
	err := g.Wait()

	if cerr := a.q.Close(); cerr != nil {
		err = cmpErr(err, cerr)
	}
	// ctx is done by now; the final state write must still happen.
	a.saveState(context.WithoutCancel(ctx), func(s *State) {
		s.PID = 0
		s.Connected = false
	})
	a.log.Info().Msg("agent stopped")
	return err
}

// receivedAt is when state.json says the certificate was obtained, if
// state.json describes this certificate; zero otherwise.
func receivedAt(st State, id *identity) time.Time {
	if !st.NotAfter.Equal(id.leaf.NotAfter) {
		return time.Time{}
	}
	if !st.LastRenewal.IsZero() {
		return st.LastRenewal
	}
	return st.EnrolledAt
}

// loadFromDisk loads the identity under identity.lock.
func (a *runner) loadFromDisk(ctx context.Context) (*identity, error) {
	l, err := lock(ctx, filepath.Join(a.dir, identityLock))
	if err != nil {
		return nil, err
	}
	defer l.unlock()
	return loadIdentity(a.dir, a.log)
}

// current returns the identity and a channel closed when it changes.
func (a *runner) current() (*identity, string, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.id, a.brokerURL, a.changed
}

// setIdentity installs a new identity and wakes the loops waiting on the old one.
func (a *runner) setIdentity(id *identity, brokerURL string) {
	id.jitter = a.cfg.Rand() // before publishing: identities are read without locks
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.id != nil && a.id.serial() == id.serial() && (brokerURL == "" || brokerURL == a.brokerURL) {
		// The same certificate seen twice — this process's renewal, and
		// the file watcher reading what it wrote before the renewal got
		// here: nothing to reconnect for.
		a.certStamp = stampOf(filepath.Join(a.dir, certFile))
		return
	}
	a.id = id
	if brokerURL != "" {
		a.brokerURL = brokerURL
	}
	a.certStamp = stampOf(filepath.Join(a.dir, certFile))
	a.blockedUntil = time.Time{}
	a.condition = ""
	close(a.changed)
	a.changed = make(chan struct{})
}

// noteRenewal records when the certificate was last renewed, for
// admitRenewCommand.
func (a *runner) noteRenewal(at time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if at.After(a.lastRenewal) {
		a.lastRenewal = at
	}
}

// admitRenewCommand decides whether a renew command is obeyed: not within
// RenewCommandInterval of the last renewal or obeyed command. Each renewal
// writes a new key to the SD card and asks the CA to sign; a backend stuck
// in a loop must not do that every second. Scheduled renewals, and those
// the broker's refusals call for, do not come through here.
func (a *runner) admitRenewCommand(now time.Time) *commandError {
	a.mu.Lock()
	defer a.mu.Unlock()
	last := a.lastRenewal
	if a.lastRenewCmd.After(last) {
		last = a.lastRenewCmd
	}
	// A clock set back since (a Pi without RTC) puts last in the future:
	// then the interval cannot be measured, and the command is obeyed.
	if since := now.Sub(last); !last.IsZero() && since >= 0 && since < a.cfg.RenewCommandInterval {
		next := last.Add(a.cfg.RenewCommandInterval)
		return &commandError{"rate_limited", fmt.Sprintf(
			"renewed or asked to renew %s ago; at most one renew command per %s is obeyed, the next from %s",
			since.Round(time.Second), a.cfg.RenewCommandInterval, next.UTC().Format(time.RFC3339))}
	}
	a.lastRenewCmd = now
	return nil
}

func (a *runner) requestRenew() {
	select {
	case a.renewNow <- struct{}{}:
	default:
	}
}

// hintRenew asks for a renewal because the broker refused the connection:
// the server's answer tells whether the certificate is revoked or expired
// for it. renewLoop acts on the first hint after the broker last accepted
// the device, then on at most one per RetryMax, so a broker that refuses
// for other reasons cannot make the agent renew over and over, while a
// refusal after a working session (a revocation, the server restored from
// an older backup) is checked at once. serial is the refused certificate's:
// a refusal of one already replaced is no reason to renew again.
func (a *runner) hintRenew(serial string) {
	for {
		select {
		case a.renewHint <- serial:
			return
		default:
			select {
			case <-a.renewHint: // the latest refusal is the one that counts
			default:
			}
		}
	}
}

func (a *runner) setInterval(d time.Duration) {
	for {
		select {
		case a.intervalCh <- d:
			return
		default:
			select {
			case <-a.intervalCh: // replace a value not yet taken
			default:
			}
		}
	}
}

// saveState updates state.json, adding the queue counters; a failure is
// logged, not fatal: state.json is for people, the agent does not need it.
func (a *runner) saveState(ctx context.Context, fn func(*State)) {
	var pending int
	var dropped uint64
	if a.q != nil {
		pending, _, dropped = a.q.Stats()
	}
	now := a.cfg.Now()
	err := a.ss.update(ctx, func(s *State) {
		fn(s)
		if a.q != nil {
			s.QueuePending, s.QueueDropped, s.QueueCounted = pending, dropped, now
		}
	})
	if err != nil {
		a.log.Warn().Err(err).Msg("save state")
		return
	}
	if a.q != nil {
		a.savedPending.Store(int64(pending))
	}
}

func (a *runner) recordError(ctx context.Context, err error) {
	now := a.cfg.Now()
	a.saveState(ctx, func(s *State) {
		s.LastError = err.Error()
		s.LastErrorAt = now
	})
}

// setCondition records a condition in memory and state.json, when it changes.
func (a *runner) setCondition(ctx context.Context, cond string, err error) bool {
	a.mu.Lock()
	same := a.condition == cond
	a.condition = cond
	a.mu.Unlock()
	if same {
		return false
	}
	now := a.cfg.Now()
	a.saveState(ctx, func(s *State) {
		s.Condition = cond
		if err != nil {
			s.LastError, s.LastErrorAt = err.Error(), now
		}
	})
	return true
}

// block stops connection attempts until until, for a device the server
// turned away for good (revoked, expired beyond the grace, certificate
// unknown): retrying sooner cannot help.
func (a *runner) block(ctx context.Context, cond string, err error, until time.Time) {
	a.mu.Lock()
	a.blockedUntil = until
	a.mu.Unlock()
	a.setCondition(ctx, cond, err)
}

func (a *runner) blocked(now time.Time) (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.blockedUntil, now.Before(a.blockedUntil)
}

// sleep waits for d, a change of identity or the end of ctx; it reports
// whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration, changed <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-changed:
	case <-t.C:
	}
	return true
}

// sampleLoop samples telemetry every interval into the queue, starting at once.
func (a *runner) sampleLoop(ctx context.Context) error {
	interval := a.cfg.Interval
	t := time.NewTicker(interval)
	defer t.Stop()
	a.sampleOnce()
	for {
		select {
		case <-ctx.Done():
			return nil
		case d := <-a.intervalCh:
			interval = d
			t.Reset(d)
			a.log.Info().Stringer("interval", d).Msg("telemetry interval changed")
		case <-t.C:
			a.sampleOnce()
		}
	}
}

// sampleOnce queues one telemetry sample, unless the server has turned the
// device away (revoked, expired beyond the grace, unknown): such samples
// could never be delivered, and a Pi left running would write and fsync
// them to its SD card for as long as it runs.
func (a *runner) sampleOnce() {
	now := a.cfg.Now()
	if _, blocked := a.blocked(now); blocked {
		if !a.pausedSampling.Swap(true) {
			a.log.Info().Msg("telemetry not sampled while the server turns this device away")
		}
		return
	}
	a.pausedSampling.Store(false)
	s, err := a.samp.sample(now)
	if err != nil {
		a.log.Warn().Err(err).Msg("telemetry sample failed")
		return
	}
	b, err := json.Marshal(s)
	if err != nil {
		a.log.Error().Err(err).Msg("encode telemetry")
		return
	}
	if err := a.q.Append(topicTelemetry, b); err != nil {
		a.log.Error().Err(err).Msg("queue telemetry")
	}
}

// maintainLoop syncs the queue in batches, watches cert.pem for a renewal
// done by another process and saves queue counters now and then.
func (a *runner) maintainLoop(ctx context.Context) error {
	syncT := time.NewTicker(a.cfg.QueueSyncInterval)
	defer syncT.Stop()
	certT := time.NewTicker(a.cfg.CertCheckInterval)
	defer certT.Stop()
	stateT := time.NewTicker(a.cfg.StateInterval)
	defer stateT.Stop()
	var lastPending int
	var lastDropped uint64
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-syncT.C:
			if err := a.q.Flush(); err != nil {
				a.log.Error().Err(err).Msg("sync queue")
			}
			// The queue drained since the counters were saved: said at
			// once, so that status does not show a backlog delivered
			// minutes ago (QA: 86 pending, all delivered).
			if p, _, _ := a.q.Stats(); p == 0 && a.savedPending.Load() > 0 {
				a.saveState(ctx, func(*State) {})
			}
		case <-certT.C:
			a.checkCertFile(ctx)
		case <-stateT.C:
			p, _, d := a.q.Stats()
			if p != lastPending || d != lastDropped {
				lastPending, lastDropped = p, d
				a.saveState(ctx, func(*State) {})
			}
		}
	}
}

// checkCertFile adopts a certificate written by `device-agent renew`.
func (a *runner) checkCertFile(ctx context.Context) {
	a.mu.Lock()
	old := a.certStamp
	cur := a.id
	a.mu.Unlock()
	if stampOf(filepath.Join(a.dir, certFile)) == old {
		return
	}
	id, err := a.loadFromDisk(ctx)
	if err != nil {
		a.log.Warn().Err(err).Msg("reload certificate")
		return
	}
	st, _ := readState(a.dir)
	if id.serial() == cur.serial() {
		a.mu.Lock()
		a.certStamp = stampOf(filepath.Join(a.dir, certFile))
		a.mu.Unlock()
		return
	}
	id.received = receivedAt(st, id)
	a.log.Info().Str("serial", id.serial()).Time("not_after", id.leaf.NotAfter).Msg("certificate renewed by another process; switching to it")
	a.setIdentity(id, st.BrokerURL)
	a.noteRenewal(st.LastRenewal)
}

// renewLoop renews at the scheduled time, on request, and after expiry;
// failures back off, revocation and the need for a new token back off long.
func (a *runner) renewLoop(ctx context.Context) error {
	attempt, blockedAttempt, aheadAttempt := 0, 0, 0
	var retryAt, lastHint time.Time
	var hintSessions uint64 // a.sessions when lastHint was acted on
	for {
		id, _, changed := a.current()
		now := a.cfg.Now()
		mode, at := planRenewal(now, id.leaf.NotBefore, id.leaf.NotAfter, id.received, a.cfg.Grace, id.jitter)
		switch mode {
		case modeClockBehind:
			if a.setCondition(ctx, CondClockWrong, errClockBehind) {
				a.log.Warn().Time("now", now).Time("not_before", id.leaf.NotBefore).Msg(errClockBehind.Error())
			}
			at = now.Add(a.cfg.ClockPollInterval)
		case modeWait:
			if aheadAttempt > 0 {
				// The clock that was ahead agrees with the certificate
				// again (time sync): the device is fine.
				aheadAttempt, retryAt = 0, time.Time{}
				if a.setCondition(ctx, "", nil) {
					a.log.Info().Msg("system clock agrees with the certificate again")
				}
			}
		default:
			at = now
		}
		if a.clockStillWrong(now) {
			at = now.Add(a.cfg.ClockPollInterval)
			mode = modeClockBehind
		}
		if retryAt.After(at) {
			at = retryAt
		}
		if aheadAttempt > 0 && at.Sub(now) > a.cfg.ClockPollInterval {
			// Look at the clock often (cheap), renew seldom (a key and a
			// signature): planning again clears the condition once the
			// clock agrees.
			at = now.Add(a.cfg.ClockPollInterval)
		}
		forced := false
		if d := at.Sub(now); d > 0 {
			a.log.Debug().Str("mode", mode.String()).Time("at", at).Msg("next renewal check")
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-changed:
				t.Stop()
				attempt, blockedAttempt, retryAt = 0, 0, time.Time{}
				continue
			case <-a.renewNow:
				t.Stop()
				if retryAt.After(a.cfg.Now()) {
					a.log.Info().Time("retry_at", retryAt).Msg("renewal requested; waiting for the backoff of the last failure")
					continue
				}
				forced = true
			case serial := <-a.renewHint:
				t.Stop()
				if serial != id.serial() {
					// An attempt with the old certificate, refused while
					// the renewal that replaced it was under way (QA: a
					// flaky test saw two renewals for one revocation).
					a.log.Debug().Str("serial", serial).Msg("broker refusal of a certificate already replaced: ignored")
					continue
				}
				now := a.cfg.Now()
				sessions := a.sessions.Load()
				recent := !lastHint.IsZero() && sessions == hintSessions && now.Sub(lastHint) < a.cfg.RetryMax
				if retryAt.After(now) || recent {
					a.log.Debug().Msg("broker refusal: renewal checked recently, not again yet")
					continue
				}
				lastHint, hintSessions = now, sessions
				forced = true
			case <-t.C:
				continue // plan again: the clock may have moved
			}
		}
		if !forced && (mode == modeWait || mode == modeClockBehind) {
			continue
		}

		newID, err := renewAndCommit(ctx, a.cfg, a.ss, id)
		if ctx.Err() != nil {
			return nil
		}
		now = a.cfg.Now()
		if err == nil {
			st, _ := readState(a.dir)
			attempt, blockedAttempt, retryAt = 0, 0, time.Time{}
			a.setIdentity(newID, st.BrokerURL)
			a.noteRenewal(now)
			if now.Before(newID.leaf.NotAfter) {
				aheadAttempt = 0
				a.saveState(ctx, func(s *State) { s.Condition = "" })
				continue
			}
			// Expired on arrival: the clock is ahead by more than a
			// lifetime (a garbage RTC). Renewing again would loop, each
			// time with a new key on the SD card and a signature at the
			// CA; wait for time sync, checking now and then.
			retryAt = now.Add(backoff(aheadAttempt, a.cfg.RetryMin, a.cfg.RetryMax, a.cfg.Rand()))
			aheadAttempt++
			if a.setCondition(ctx, CondClockWrong, errClockAhead) {
				a.log.Warn().Time("now", now).Time("not_after", newID.leaf.NotAfter).Msg(errClockAhead.Error())
			}
			continue
		}
		switch f := classify(err); f {
		case failClock:
			var ce *ClockError
			if errors.As(err, &ce) && ce.Skew != 0 {
				a.mu.Lock()
				a.clock = &clockRef{server: now.Add(-ce.Skew), at: time.Now()}
				a.mu.Unlock()
			}
			if a.setCondition(ctx, CondClockWrong, err) {
				a.log.Warn().Err(err).Msg("renewal waits for time sync")
			}
			retryAt = now.Add(a.cfg.ClockPollInterval)
		case failRevoked, failNeedsToken, failCertUnknown, failSuperseded:
			d := backoff(blockedAttempt, a.cfg.BlockedRetryMin, a.cfg.BlockedRetryMax, a.cfg.Rand())
			blockedAttempt++
			retryAt = now.Add(d)
			cond := blockedConditions[f]
			a.block(ctx, cond, err, retryAt)
			a.log.Error().Err(err).Time("retry_at", retryAt).Msg(conditionText(cond))
		default:
			d := backoff(attempt, a.cfg.RetryMin, a.cfg.RetryMax, a.cfg.Rand())
			attempt++
			var se *ServerError
			if errors.As(err, &se) && se.RetryAfter > d {
				d = se.RetryAfter
			}
			retryAt = now.Add(d)
			a.recordError(ctx, err)
			if mode == modeWait {
				// A check asked for (a broker refusal, the renew
				// command) of a certificate not yet due: it is tried
				// again when due, or when asked again after the backoff.
				a.log.Warn().Err(err).Time("due", at).Msg("renewal check failed; not retried before the certificate is due")
				continue
			}
			a.log.Warn().Err(err).Stringer("retry_in", d.Round(time.Millisecond)).Msg("renewal failed")
		}
	}
}

// clockStillWrong reports whether the local clock is still off the server
// time last seen with a skew, estimated with the monotonic clock.
func (a *runner) clockStillWrong(now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.clock == nil {
		return false
	}
	server := a.clock.server.Add(time.Since(a.clock.at))
	if abs(now.Sub(server)) > a.cfg.MaxClockSkew {
		return true
	}
	a.clock = nil
	a.log.Info().Msg("local clock agrees with the server again")
	return false
}

// droppedAfterDial reports a connection closed by the broker during the
// handshake or before CONNACK.
func droppedAfterDial(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "EOF") || strings.Contains(s, "connection reset by peer") || strings.Contains(s, "broken pipe")
}

// errIdentityChanged ends a session so the next one uses the new certificate.
var errIdentityChanged = errors.New("certificate changed")

// nextConnectAttempt returns the backoff attempt to reconnect with after a
// session that connected or not and lasted that long. A session that held
// for stable shows the broker works: the next reconnection starts the
// backoff afresh. Waiting for the backoff's maximum (2 min) instead held a
// Pi on a link that drops every minute or so at that maximum for good,
// offline half the time; a broker dropping the device at once still backs
// off in full.
func nextConnectAttempt(attempt int, connected bool, lasted, stable time.Duration) int {
	if connected && lasted >= stable {
		return 0
	}
	return attempt
}

// connectLoop keeps one MQTT session up, with backoff between attempts.
func (a *runner) connectLoop(ctx context.Context) error {
	attempt, refusals := 0, 0
	var expiredSaid time.Time // NotAfter of the certificate last reported expired
	for ctx.Err() == nil {
		id, broker, changed := a.current()
		now := a.cfg.Now()
		if until, ok := a.blocked(now); ok {
			a.log.Info().Time("until", until).Msg("not connecting: the server turned this device away; see device-agent status")
			if !sleep(ctx, until.Sub(now), changed) {
				return nil
			}
			continue
		}
		if now.Before(id.leaf.NotBefore) {
			// The broker's certificate would not verify either; retrying
			// sooner only fills the log.
			if !sleep(ctx, a.cfg.ClockPollInterval, changed) {
				return nil
			}
			continue
		}
		if !now.Before(id.leaf.NotAfter) {
			// renewLoop renews an expired certificate by itself. Said
			// once per certificate: an outage of the enrollment server
			// may last days, and the journal is on the SD card.
			if !expiredSaid.Equal(id.leaf.NotAfter) {
				expiredSaid = id.leaf.NotAfter
				a.log.Warn().Time("not_after", id.leaf.NotAfter).Msg("certificate expired; waiting for renewal before connecting")
			}
			if !sleep(ctx, a.cfg.ClockPollInterval, changed) {
				return nil
			}
			continue
		}
		start := time.Now()
		connected, err := a.session(ctx, id, broker, changed)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errIdentityChanged) {
			attempt = 0
			continue
		}
		attempt = nextConnectAttempt(attempt, connected, time.Since(start), a.cfg.ConnectStable)
		// A refused client certificate shows as a TLS alert, or, when the
		// broker's reset overtakes the alert, as EOF or a reset.
		switch {
		case connected:
			refusals = 0
		case errors.Is(err, errClosedBeforeCert):
			// A full broker, not a refusal: renewing would not help,
			// and a fleet over the limit would all renew at once.
		case authRejected(err):
			refusals = 0
			a.log.Warn().Err(err).Msg("broker refused the certificate; checking it with the enrollment server")
			a.hintRenew(id.serial())
		case droppedAfterDial(err) && time.Since(start) < a.cfg.RefusalWindow:
			if refusals++; refusals >= 3 {
				refusals = 0
				a.hintRenew(id.serial())
			}
		case droppedAfterDial(err):
			// Cut late: a slow link missing the broker's handshake
			// deadline, not a refusal (QA: a 4 kbit/s link made agents
			// renew valid certificates).
			refusals = 0
		}
		d := backoff(attempt, a.cfg.ConnectRetryMin, a.cfg.ConnectRetryMax, a.cfg.Rand())
		attempt++
		if _, blocked := a.blocked(a.cfg.Now()); !blocked {
			// A block's reason (revoked, ...) is the error status must
			// show; an attempt under way when the block came would
			// replace it with the TLS refusal it explains.
			a.recordError(ctx, err)
		}
		a.log.Warn().Err(err).Stringer("retry_in", d.Round(time.Millisecond)).Msg("broker connection failed")
		if !sleep(ctx, d, changed) {
			return nil
		}
	}
	return nil
}
