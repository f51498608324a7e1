package agent

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
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
}

// ReadStatus reads the state folder without changing it, so it is safe
// while an agent runs. The certificate on disk is the truth for dates; a
// connected flag left by an agent that died is not reported as connected.
func ReadStatus(stateDir string) (Status, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	st, err := readState(stateDir)
	if errors.Is(err, ErrNotEnrolled) {
		return Status{}, nil
	}
	if err != nil {
		return Status{}, err
	}
	s := Status{
		Enrolled:     true,
		DeviceID:     st.DeviceID,
		ServerURL:    st.ServerURL,
		BrokerURL:    st.BrokerURL,
		NotAfter:     st.NotAfter,
		LastRenewal:  st.LastRenewal,
		Since:        st.ConnectedChanged,
		Condition:    st.Condition,
		LastError:    st.LastError,
		LastErrorAt:  st.LastErrorAt,
		QueuePending: st.QueuePending,
		QueueDropped: st.QueueDropped,
		QueueCounted: st.QueueCounted,
	}
	if b, err := readOptional(filepath.Join(stateDir, certFile)); err == nil && b != nil {
		if certs, err := parseCerts(b); err == nil {
			c := certs[0]
			s.DeviceID, s.Serial, s.NotBefore, s.NotAfter = c.Subject.CommonName, c.SerialNumber.Text(16), c.NotBefore, c.NotAfter
		}
	}
	if s.Running, err = isLocked(filepath.Join(stateDir, runLock)); err != nil {
		return s, err
	}
	s.Connected = s.Running && st.Connected
	return s, nil
}

// WriteText prints s for a person.
func (s Status) WriteText(w io.Writer, now time.Time) error {
	if !s.Enrolled {
		_, err := fmt.Fprintln(w, "not enrolled")
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
	lines := []struct{ k, v string }{
		{"device", s.DeviceID},
		{"agent", conn},
		{"certificate", "serial " + s.Serial + ", valid until " + ts(s.NotAfter)},
		{"last renewal", ts(s.LastRenewal)},
		{"broker", s.BrokerURL},
		{"server", s.ServerURL},
		{"queue", queueText(s, now)},
	}
	if s.Condition != "" {
		lines = append(lines, struct{ k, v string }{"attention", conditionText(s.Condition)})
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
	adviceRevoked    = "revoked ids are never used again: enroll under a new id with a new token (device-agent enroll --force --token TOKEN --id NEW-ID)"
	adviceNeedsToken = "enroll again with a token that re-provisions this device (fleetmq token create --device ID --reprovision on the server, then device-agent enroll --force --token TOKEN)"
	// A server reset, or restored from a backup older than the device's
	// enrollment (a device it knows is taken back when it renews).
	adviceCertUnknown = "the server has no record of this certificate (its database was reset, or restored from a backup older than this device's enrollment): enroll again (fleetmq token create --device ID on the server, with --reprovision if it still lists the device; then device-agent enroll --force --token TOKEN)"
)

func conditionText(c string) string {
	switch c {
	case CondRevoked:
		return "revoked by the server; " + adviceRevoked
	case CondNeedsToken:
		return "certificate expired beyond the renewal grace; " + adviceNeedsToken
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
