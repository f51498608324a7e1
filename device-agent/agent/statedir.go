package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Files of the state folder.
const (
	keyFile   = "key.pem"
	certFile  = "cert.pem"
	caFile    = "ca.pem"
	stateFile = "state.json"
	// pendingKeyFile is the key of an enrollment not yet answered
	// (pendingKey).
	pendingKeyFile = "enroll-key.pem"
	queueDir       = "queue"
	runLock        = "run.lock"
	identityLock   = "identity.lock"
	stateLock      = "state.lock"
	nextSuffix     = ".next" // a half-committed key pair, see commitIdentity
	tempMarker     = ".tmp-"
)

// writeFileAtomic replaces path with data so that a crash or power loss
// leaves either the old or the new content, never a mix: temp file in the
// same folder, chmod, write, fsync, checked close, rename, fsync the folder.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+tempMarker+"*")
	if err != nil {
		return fmt.Errorf("create temp for %s: %w", base, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("chmod %s: %w", base, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", base, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", base, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", base, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", base, err)
	}
	return syncDir(dir)
}

// syncDir makes renames and removals in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open dir: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// removeTemps deletes temp files left by a crash inside writeFileAtomic.
func removeTemps(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") && strings.Contains(e.Name(), tempMarker) {
			_ = os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// ensureStateDir creates the state folder with mode 0700 if it is missing.
func ensureStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	return nil
}

// requireStateDir is for the commands that need an enrolled device: a
// missing folder means a wrong --state-dir or no enrollment, which the
// lock file's "no such file or directory" would not say.
func requireStateDir(dir string) error {
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state folder %s does not exist: %w (or pass the right --state-dir)", dir, ErrNotEnrolled)
	}
	if err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("state folder %s is not a folder", dir)
	}
	return nil
}

// checkStateOwner refuses to let root work in a state folder that belongs
// to another user (the service's): every file it wrote there — a renewed
// key.pem (0600), state.json, lock files, queue segments — would be
// root's, and the service could no longer read its own key. euid is the
// effective user id (os.Geteuid), cmd the command to suggest.
func checkStateOwner(dir, cmd string, euid int) error {
	if euid != 0 {
		return nil // only root can write into another user's 0700 folder
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil // a missing folder is created as root's; other errors show up on use
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || sys.Uid == 0 {
		return nil
	}
	name, sudoUser := ownerName(sys.Uid)
	return fmt.Errorf("the state folder %s is owned by %s; run as that user: sudo -u %s device-agent %s --state-dir %s "+
		"(as root, %s would leave files there that the service cannot read)", dir, name, sudoUser, cmd, dir, cmd)
}

// ownerName names a user for a message, and for sudo -u.
func ownerName(uid uint32) (name, sudoUser string) {
	id := strconv.FormatUint(uint64(uid), 10)
	name, sudoUser = "uid "+id, "'#"+id+"'" // sudo -u accepts #uid
	if u, err := user.LookupId(id); err == nil {
		name, sudoUser = u.Username+" (uid "+id+")", u.Username
	}
	return name, sudoUser
}

// permissionAdvice adds whose the state folder is to a permission error
// that another user (euid) met in it: `device-agent status` typed without
// `sudo -u device-agent` got "permission denied" and nothing more.
func permissionAdvice(err error, dir, cmd string, euid int) error {
	if !errors.Is(err, fs.ErrPermission) || euid == 0 {
		return err
	}
	st, serr := os.Stat(dir)
	if serr != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || int(sys.Uid) == euid {
		return err
	}
	name, sudoUser := ownerName(sys.Uid)
	return fmt.Errorf("%w (the state folder %s is owned by %s; run as that user: sudo -u %s device-agent %s --state-dir %s)",
		err, dir, name, sudoUser, cmd, dir)
}

// errLocked is returned by tryLock when another process holds the lock.
var errLocked = errors.New("locked by another process")

// flock is an advisory lock on a file of the state folder.
type flock struct{ f *os.File }

// tryLock takes an exclusive lock without waiting.
func tryLock(path string) (*flock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if errors.Is(err, syscall.EROFS) {
		// A card the kernel remounted read-only after I/O errors: flock
		// works on a descriptor opened for reading, and no other process
		// can write there either.
		f, err = os.Open(path)
	}
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, fmt.Errorf("lock %s: %w", filepath.Base(path), err)
	}
	return &flock{f: f}, nil
}

// lockPoll is how often lock retries a busy lock. flock(2) cannot be
// interrupted by a context, so waiting is done by polling.
const lockPoll = 50 * time.Millisecond

// lock takes an exclusive lock, waiting until ctx is done.
func lock(ctx context.Context, path string) (*flock, error) {
	for {
		l, err := tryLock(path)
		if !errors.Is(err, errLocked) {
			return l, err
		}
		t := time.NewTimer(lockPoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("wait for %s: %w", filepath.Base(path), ctx.Err())
		case <-t.C:
		}
	}
}

func (l *flock) unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the descriptor drops the lock
	l.f = nil
	return err
}

// rlock takes path's lock shared, for a reader that must not create files
// (`status`, perhaps run by another user): it opens read-only and waits at
// most budget, then reports false and the caller reads without the lock.
// A missing file means no one ever locked it.
func rlock(path string, budget time.Duration) (*flock, bool) {
	f, err := os.Open(path)
	if err != nil {
		return nil, false
	}
	deadline := time.Now().Add(budget)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		if err == nil {
			return &flock{f: f}, true
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			_ = f.Close()
			return nil, false
		}
		time.Sleep(lockPoll)
	}
}

// isLocked reports whether some process holds path's lock; a missing file
// means no one does. It never creates the file, so a read-only `status` is safe.
func isLocked(path string) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("open lock: %w", err)
	}
	defer f.Close()
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("probe lock: %w", err)
	}
	return false, nil
}

// Conditions that stop the agent from working normally, shown by `status`.
const (
	CondRevoked     = "revoked"           // the server revoked the certificate or device
	CondNeedsToken  = "needs_token"       // the certificate expired beyond the grace
	CondCertUnknown = "cert_unknown"      // the server has no record of the certificate
	CondClockWrong  = "waiting_for_clock" // local clock too far from the certificate or server
	CondSuperseded  = "superseded"        // the device was re-provisioned with another key
)

// State is state.json: what `status` shows and what `run` needs besides the
// key material. It holds no secret.
type State struct {
	DeviceID    string    `json:"device_id"`
	ServerURL   string    `json:"server_url"`
	BrokerURL   string    `json:"broker_url"`
	EnrolledAt  time.Time `json:"enrolled_at,omitzero"`
	LastRenewal time.Time `json:"last_renewal,omitzero"`
	NotAfter    time.Time `json:"not_after,omitzero"`

	Connected        bool      `json:"connected"`
	ConnectedChanged time.Time `json:"connected_changed,omitzero"`
	Condition        string    `json:"condition,omitempty"`
	LastError        string    `json:"last_error,omitempty"`
	LastErrorAt      time.Time `json:"last_error_at,omitzero"`
	QueuePending     int       `json:"queue_pending"`
	QueueDropped     uint64    `json:"queue_dropped"`
	QueueCounted     time.Time `json:"queue_counted,omitzero"` // when the two above were taken
	// QueueProblem says why the running agent could not open its on-disk
	// queue and holds telemetry in memory; empty when it opened.
	QueueProblem string `json:"queue_problem,omitempty"`
	PID          int    `json:"pid,omitempty"`
	AgentVersion string `json:"agent_version,omitempty"`
}

// stateStore serializes read-modify-write cycles of state.json, within the
// process by a mutex and across processes by state.lock.
type stateStore struct {
	dir string
	mu  sync.Mutex
}

// ErrNotEnrolled is returned when the state folder holds no identity.
var ErrNotEnrolled = errors.New("not enrolled: run `device-agent enroll` first")

// adviceWriteURLs is how a person gives a device its URLs back by hand.
const adviceWriteURLs = `write them back as {"server_url": "https://...", "broker_url": "mqtts://..."} ` +
	`(the other fields are refilled by the agent)`

// adviceReenroll is how a device whose state folder lost something that
// only the server can give back gets it again, keeping its id.
const adviceReenroll = "enroll again under the same id: fleetmq token create --device ID --reprovision on the server, " +
	"then " + reenrollSteps

// state.json is the agent's bookkeeping, but it is also the only place on
// the device that holds the server and broker URLs given at enrollment:
// without them the agent can neither connect nor renew, so it cannot start
// afresh from an empty state. What it does instead is say so.
var (
	// errStateUnreadable is a state.json that exists but does not parse.
	errStateUnreadable = errors.New("state.json is unreadable")
	// errStateMissing is a missing state.json next to a key pair.
	errStateMissing = errors.New("state.json is missing although the device has a certificate: it holds the server and broker URLs " +
		"this device enrolled with, which nothing else on the device records: " + adviceWriteURLs + ", or " + adviceReenroll)
)

// checkURLs reports a server or broker URL in state.json that the agent
// cannot use, as a hand-written or half-edited state.json may hold: `run`
// would start with it and fail only at the first renewal weeks later (no
// server URL), or send its CONNECT in clear (an mqtt:// broker URL).
func (st State) checkURLs(dir string) error {
	var problems []string
	if _, err := parseServerURL(st.ServerURL); err != nil {
		problems = append(problems, err.Error())
	}
	if _, err := parseBrokerURL(st.BrokerURL); err != nil {
		problems = append(problems, err.Error())
	}
	if problems == nil {
		return nil
	}
	return fmt.Errorf("%s: %s; %s, or %s", filepath.Join(dir, stateFile), strings.Join(problems, "; "), adviceWriteURLs, adviceReenroll)
}

func readState(dir string) (State, error) {
	var s State
	path := filepath.Join(dir, stateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, ErrNotEnrolled
	}
	if err != nil {
		return s, fmt.Errorf("read state: %w", err)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("%w (%s: %v). It is the agent's bookkeeping, but it also holds the server and broker URLs "+
			"this device enrolled with, which nothing else on the device records, so removing it does not help: "+
			"%s, or %s", errStateUnreadable, path, err, adviceWriteURLs, adviceReenroll)
	}
	return s, nil
}

// update applies fn to the current state and writes it back atomically. A
// missing state.json starts from the zero State.
func (s *stateStore) update(ctx context.Context, fn func(*State)) error {
	return s.locked(ctx, func() error {
		st, err := readState(s.dir)
		if err != nil && !errors.Is(err, ErrNotEnrolled) {
			return err
		}
		fn(&st)
		return writeState(s.dir, st)
	})
}

// replace writes st as the whole state, whatever state.json held: an
// enrollment starts the bookkeeping afresh, and may be what mends an
// unreadable state.json.
func (s *stateStore) replace(ctx context.Context, st State) error {
	return s.locked(ctx, func() error { return writeState(s.dir, st) })
}

// locked runs fn holding the state lock, against this process's other
// goroutines (mu) and other processes (the lock file).
func (s *stateStore) locked(ctx context.Context, fn func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, err := lock(ctx, filepath.Join(s.dir, stateLock))
	if err != nil {
		return err
	}
	defer l.unlock()
	return fn()
}

func writeState(dir string, st State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, stateFile), append(b, '\n'), 0o600)
}
