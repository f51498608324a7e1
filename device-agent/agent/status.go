package agent

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Status is what `device-agent status` shows.
type Status struct {
	Enrolled     bool      `json:"enrolled"`
	DeviceID     string    `json:"device_id,omitempty"`
	ServerURL    string    `json:"server_url,omitempty"`
	BrokerURL    string    `json:"broker_url,omitempty"`
	Serial       string    `json:"serial,omitempty"`
	NotBefore    time.Time `json:"not_before,omitzero"`
	NotAfter     time.Time `json:"not_after,omitzero"`
	LastRenewal  time.Time `json:"last_renewal,omitzero"`
	Running      bool      `json:"running"`   // a `run` holds the state folder
	Connected    bool      `json:"connected"` // to the broker, as last reported by the running agent
	Since        time.Time `json:"since,omitzero"`
	Condition    string    `json:"condition,omitempty"`
	LastError    string    `json:"last_error,omitempty"`
	LastErrorAt  time.Time `json:"last_error_at,omitzero"`
	QueuePending int       `json:"queue_pending"`
	QueueDropped uint64    `json:"queue_dropped"`
	// QueueCounted is when the running agent last saved the queue counters
	// (on state changes and every few minutes, to spare the SD card).
	QueueCounted time.Time `json:"queue_counted,omitzero"`
	// Broken says why `run` cannot work with this state folder (key and
	// certificate missing, unreadable or not a pair, state.json unreadable),
	// and what to do; empty when the folder is sound. `status` exits 1 then.
	Broken string `json:"broken,omitempty"`
	// Warnings are problems the agent works around or fixes at start.
	Warnings []string `json:"warnings,omitempty"`
	// StateDir is the state folder read.
	StateDir string `json:"state_dir"`
	noDir    bool   // StateDir does not exist
}

// identityLockBudget bounds how long status waits for a renewal in progress.
const identityLockBudget = 2 * time.Second

// ReadStatus reads the state folder without changing it, so it is safe
// while an agent runs. The certificate on disk is the truth for dates; a
// connected flag left by an agent that died is not reported as connected.
// The key pair is checked the way `run` loads it; a broken one is reported
// in Broken, not as an error, so the rest of the status still shows.
func ReadStatus(stateDir string) (Status, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	st, stateErr := readState(stateDir)
	if stateErr != nil && !errors.Is(stateErr, ErrNotEnrolled) && !errors.Is(stateErr, errStateUnreadable) {
		return Status{}, stateErr
	}
	s, idErr := inspectIdentity(stateDir)
	s.StateDir = stateDir
	if errors.Is(stateErr, ErrNotEnrolled) {
		if errors.Is(idErr, ErrNotEnrolled) {
			_, err := os.Stat(stateDir)
			return Status{StateDir: stateDir, noDir: errors.Is(err, fs.ErrNotExist)}, nil
		}
		stateErr = errStateMissing
	}
	s.Enrolled = true
	if stateErr == nil {
		if s.DeviceID != "" && st.DeviceID != "" && s.DeviceID != st.DeviceID {
			s.Warnings = append(s.Warnings, fmt.Sprintf("cert.pem is for device %s, state.json says %s: the agent uses the certificate's", s.DeviceID, st.DeviceID))
		}
		if s.DeviceID == "" {
			s.DeviceID = st.DeviceID
		}
		if s.NotAfter.IsZero() {
			s.NotAfter = st.NotAfter
		}
		s.ServerURL, s.BrokerURL, s.LastRenewal = st.ServerURL, st.BrokerURL, st.LastRenewal
		s.Since, s.Condition, s.LastError, s.LastErrorAt = st.ConnectedChanged, st.Condition, st.LastError, st.LastErrorAt
		s.QueuePending, s.QueueDropped, s.QueueCounted = st.QueuePending, st.QueueDropped, st.QueueCounted
		stateErr = st.checkURLs(stateDir)
	}
	if err := cmpErr(idErr, stateErr); err != nil {
		s.Broken = err.Error()
	}
	if readOnlyFS(stateDir) {
		s.Warnings = append(s.Warnings, "the state folder is on a read-only file system (an SD card the kernel remounted read-only "+
			"after I/O errors?): run holds telemetry in memory and cannot save its queue, state.json or a renewed certificate; "+
			"check the card (dmesg, fsck) and reboot")
	}
	var err error
	if s.Running, err = isLocked(filepath.Join(stateDir, runLock)); err != nil {
		return s, err
	}
	s.Connected = s.Running && st.Connected
	if s.Running && st.QueueProblem != "" {
		s.Warnings = append(s.Warnings, st.QueueProblem)
	}
	return s, nil
}

// inspectIdentity checks the key pair as loadIdentity would load it, and
// returns what it found about the certificate. An error means `run` would
// refuse to start (or, for ErrNotEnrolled, that there is no identity).
func inspectIdentity(dir string) (Status, error) {
	var s Status
	// A renewal renames several files; wait briefly for one in progress
	// so as not to report a half-done commit as broken.
	if l, ok := rlock(filepath.Join(dir, identityLock), identityLockBudget); ok {
		defer l.unlock()
	}
	pick, err := pickIdentity(dir)
	if err != nil {
		if b, _ := readOptional(filepath.Join(dir, certFile)); b != nil {
			// Still show what the certificate says, if it parses.
			if certs, err := parseCerts(b); err == nil {
				s.DeviceID, s.Serial, s.NotBefore, s.NotAfter = certs[0].Subject.CommonName, certs[0].SerialNumber.Text(16), certs[0].NotBefore, certs[0].NotAfter
			}
		}
		return s, err
	}
	c := pick.leaf
	s.DeviceID, s.Serial, s.NotBefore, s.NotAfter = c.Subject.CommonName, c.SerialNumber.Text(16), c.NotBefore, c.NotAfter
	if _, err := pick.identity(); err != nil {
		return s, err
	}
	if pick.keyNext || pick.certNext || pick.caNext {
		s.Warnings = append(s.Warnings, "a renewal was interrupted after its new certificate was saved: the agent completes it at start")
	}
	name := keyFile
	if pick.keyNext {
		name += nextSuffix
	}
	if st, err := os.Stat(filepath.Join(dir, name)); err == nil {
		if p := keyModeProblem(st.Mode()); p != "" {
			s.Warnings = append(s.Warnings, p+"; the agent makes it 0600 at start, and device-agent renew replaces the key")
		}
	}
	return s, nil
}

// WriteText prints s for a person.
func (s Status) WriteText(w io.Writer, now time.Time) error {
	if !s.Enrolled {
		var err error
		if s.noDir {
			// A typo in --state-dir looks like a device never enrolled.
			_, err = fmt.Fprintf(w, "not enrolled: there is no state folder %s (is --state-dir right?)\n", s.StateDir)
		} else {
			_, err = fmt.Fprintf(w, "not enrolled (state folder %s)\n", s.StateDir)
		}
		return err
	}
	ts := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.Local().Format(time.RFC3339) + " (" + human(t.Sub(now)) + ")"
	}
	conn := "not running"
	switch {
	case s.Connected:
		conn = "running, connected since " + ts(s.Since)
	case s.Running:
		conn = "running, not connected"
	}
	cert := "serial " + s.Serial + ", valid until " + ts(s.NotAfter)
	if s.Serial == "" {
		cert = "unreadable"
	}
	lines := []struct{ k, v string }{
		{"device", s.DeviceID},
		{"agent", conn},
		{"certificate", cert},
		{"last renewal", ts(s.LastRenewal)},
		{"broker", s.BrokerURL},
		{"server", s.ServerURL},
		{"queue", queueText(s, now)},
	}
	if s.Broken != "" {
		lines = append(lines, struct{ k, v string }{"attention", "broken: " + s.Broken})
	}
	if s.Condition != "" {
		lines = append(lines, struct{ k, v string }{"attention", conditionText(s.Condition)})
	}
	for _, w := range s.Warnings {
		lines = append(lines, struct{ k, v string }{"warning", w})
	}
	if s.LastError != "" {
		lines = append(lines, struct{ k, v string }{"last error", s.LastError + " at " + ts(s.LastErrorAt)})
	}
	for _, l := range lines {
		if _, err := fmt.Fprintf(w, "%-13s %s\n", l.k+":", l.v); err != nil {
			return err
		}
	}
	return nil
}

// queueText gives the queue counters with their age: the agent saves them
// every few minutes, so "3 pending" may be from before the queue drained.
func queueText(s Status, now time.Time) string {
	q := fmt.Sprintf("%d pending, %d dropped", s.QueuePending, s.QueueDropped)
	if !s.QueueCounted.IsZero() {
		q += " (counted " + human(s.QueueCounted.Sub(now)) + ")"
	}
	return q
}

// What a person does about an agent the server turned away, in status,
// errors and logs alike.
const (
	adviceRevoked    = "revoked ids are never used again: enroll under a new id with a new token (" + reenrollEnroll + " --id NEW-ID" + reenrollStart + ")"
	adviceSuperseded = "if this hardware is to be that device again, enroll it with a token that re-provisions it (fleetmq token create --device ID --reprovision on the server, then " + reenrollSteps + ")"
	adviceNeedsToken = "enroll again with a token that re-provisions this device (fleetmq token create --device ID --reprovision on the server, then " + reenrollSteps + ")"
	// A server reset, or restored from a backup older than the device's
	// enrollment (a device it knows is taken back when it renews).
	adviceCertUnknown = "the server has no record of this certificate (its database was reset, or restored from a backup older than this device's enrollment): enroll again (fleetmq token create --device ID on the server, with --reprovision if it still lists the device; then " + reenrollSteps + ")"
	// reenrollSteps enrolls a device again: the running agent holds the
	// state folder, and "-" reads the token from stdin, out of the shell's
	// history and the process list.
	reenrollSteps  = reenrollEnroll + reenrollStart
	reenrollEnroll = "systemctl stop device-agent; device-agent enroll --force --server URL --token -"
	reenrollStart  = "; systemctl start device-agent"
)

func conditionText(c string) string {
	switch c {
	case CondRevoked:
		return "revoked by the server; " + adviceRevoked
	case CondNeedsToken:
		return "certificate expired beyond the renewal grace; " + adviceNeedsToken
	case CondSuperseded:
		return "certificate revoked: the device was re-provisioned with a new key; " + adviceSuperseded
	case CondCertUnknown:
		return adviceCertUnknown
	case CondClockWrong:
		return "waiting for the system clock to be set (time sync)"
	}
	return c
}

// human renders a duration relative to now: "in 3d4h", "2h ago".
func human(d time.Duration) string {
	suffix := ""
	prefix := "in "
	if d < 0 {
		d, prefix, suffix = -d, "", " ago"
	}
	if d < time.Minute {
		// Rounded to minutes, a fresh connection would read "0s ago".
		return prefix + d.Round(time.Second).String() + suffix
	}
	d = d.Round(time.Minute)
	var s string
	if days := d / (24 * time.Hour); days > 0 {
		s = fmt.Sprintf("%dd%dh", days, (d%(24*time.Hour))/time.Hour)
	} else {
		s = d.String()
		if len(s) > 2 && s[len(s)-2:] == "0s" {
			s = s[:len(s)-2]
		}
	}
	return prefix + s + suffix
}

// readOnlyFS reports whether dir is on a file system mounted read-only.
func readOnlyFS(dir string) bool {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return false
	}
	return st.Flags&stRdonly != 0
}

// stRdonly is ST_RDONLY of statfs(2)'s f_flags.
const stRdonly = 0x1
