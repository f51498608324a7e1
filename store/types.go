package store

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Sentinel errors callers branch on. Every error returned by the store wraps
// one of these or is an internal failure (I/O, corruption, closed database).
var (
	ErrNotFound      = errors.New("not found")
	ErrLocked        = errors.New("database is locked by another process")
	ErrClosed        = errors.New("store is closed")
	ErrTokenUnknown  = errors.New("token unknown")
	ErrTokenExpired  = errors.New("token expired")
	ErrTokenUsed     = errors.New("token has no uses left")
	ErrTokenRevoked  = errors.New("token revoked")
	ErrTokenBound    = errors.New("token is bound to another device id")
	ErrDeviceExists  = errors.New("device id already taken")
	ErrDeviceRevoked = errors.New("device revoked")
	// ErrIDRevoked is ErrDeviceExists for the id of a revoked device, which
	// not even re-provisioning brings back.
	ErrIDRevoked    = fmt.Errorf("%w: it was revoked, and revoked ids are never used again", ErrDeviceExists)
	ErrCertUnknown  = errors.New("certificate unknown")
	ErrCertRevoked  = errors.New("certificate revoked")
	ErrCertMismatch = errors.New("certificate belongs to another device")
)

// ErrTokenLive refuses a token, or a service or operator name, for an id
// that a usable token is already bound to: whichever enrolled second would
// find its token unusable only in the field. Returned as a
// *LiveTokensError naming those tokens.
var ErrTokenLive = errors.New("a usable token is already bound to the id")

// Role says what an identity may do on the broker. It is fixed when the
// identity is created and never derived from anything a client sends.
type Role string

const (
	RoleDevice   Role = "device"   // enrolled with a bootstrap token
	RoleService  Role = "service"  // backend issued by an operator (fleetmq service issue)
	RoleOperator Role = "operator" // dashboard user issued by an operator
)

// Device is one identity of the fleet (a device, a service or an operator),
// keyed by its id, which is also the CN of its certificates.
type Device struct {
	ID          string            `json:"id"`
	Role        Role              `json:"role"`
	CreatedAt   time.Time         `json:"created_at"`
	Labels      map[string]string `json:"labels,omitempty"`
	Serial      string            `json:"serial"`    // current certificate serial, lowercase hex
	NotAfter    time.Time         `json:"not_after"` // of the current certificate
	LastRenewal time.Time         `json:"last_renewal,omitzero"`
	RevokedAt   time.Time         `json:"revoked_at,omitzero"`
	TokenID     string            `json:"token_id,omitempty"` // token that enrolled it
}

// Revoked reports whether the device was revoked.
func (d Device) Revoked() bool { return !d.RevokedAt.IsZero() }

// Token is a bootstrap token as stored: only the SHA-256 of its secret.
type Token struct {
	ID       string   `json:"id"`                  // public id: hex of the first 6 bytes of Hash
	Hash     [32]byte `json:"-"`                   // SHA-256 of the secret
	DeviceID string   `json:"device_id,omitempty"` // bound id; empty means free
	// Reprovision lets a token bound to the id of an existing device,
	// active and not revoked, enroll it again: a new key and certificate
	// for the same identity, after its certificate expired beyond the
	// renewal grace or its key was lost. Without it a bound id must be new.
	Reprovision bool              `json:"reprovision,omitempty"`
	MaxUses     int               `json:"max_uses"`
	Uses        int               `json:"uses"`
	Labels      map[string]string `json:"labels,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	ExpiresAt   time.Time         `json:"expires_at"`
	RevokedAt   time.Time         `json:"revoked_at,omitzero"`
}

// Check returns why the token cannot be used at now, or nil.
func (t Token) Check(now time.Time) error {
	switch {
	case !t.RevokedAt.IsZero():
		return ErrTokenRevoked
	case !now.Before(t.ExpiresAt):
		return ErrTokenExpired
	case t.Uses >= t.MaxUses:
		return ErrTokenUsed
	}
	return nil
}

// BindingErr says why t cannot enroll the id it is bound to, given d, the
// stored identity with that id (nil: none), or returns nil if it can or t
// is bound to no id. A new id is always fine; an existing one only with
// Reprovision, and only a device that is not revoked: revoked ids are
// never used again, and tokens never yield service or operator
// certificates. Token creation and Enroll apply this rule; listings use
// it to show tokens that can no longer be used.
func (t Token) BindingErr(d *Device) error {
	switch {
	case t.DeviceID == "":
		return nil
	case d == nil && t.Reprovision:
		return ErrNotFound // nothing to re-provision
	case d == nil:
		return nil
	case !t.Reprovision:
		return ErrDeviceExists
	case d.Revoked():
		return ErrDeviceRevoked
	case d.Role != RoleDevice:
		return ErrDeviceExists
	}
	return nil
}

// LiveTokensError is ErrTokenLive with the usable tokens found, sorted by
// the id they are bound to.
type LiveTokensError struct {
	Tokens []Token
}

func (e *LiveTokensError) Error() string {
	ids := make([]string, len(e.Tokens))
	for i, t := range e.Tokens {
		ids[i] = t.DeviceID + " (token " + t.ID + ")"
	}
	return fmt.Sprintf("%v: %s", ErrTokenLive, strings.Join(ids, ", "))
}

func (e *LiveTokensError) Is(target error) bool { return target == ErrTokenLive }

// Cert is the record of one issued certificate.
type Cert struct {
	Serial    string    `json:"serial"` // lowercase hex, no leading zeros
	DeviceID  string    `json:"device_id"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	IssuedAt  time.Time `json:"issued_at"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	DER       []byte    `json:"-"`
}

// Revoked reports whether the certificate was revoked.
func (c Cert) Revoked() bool { return !c.RevokedAt.IsZero() }

// Audit actions.
const (
	ActTokenCreate  = "token.create"
	ActTokenUse     = "token.use"
	ActTokenFail    = "token.fail"
	ActTokenRevoke  = "token.revoke"
	ActCertIssue    = "cert.issue"
	ActCertRenew    = "cert.renew"
	ActRenewFail    = "cert.renew_fail"
	ActDeviceRevoke = "device.revoke"
	ActReprovision  = "device.reprovision"
	ActServiceIssue = "service.issue"
	// Before 2026-11-27 operators were issued as service.issue with
	// detail "operator".
	ActOperatorIssue = "operator.issue"
	ActBackup        = "store.backup"
	ActCertAdopt     = "cert.adopt"
	// ActEnrollRepeat: an enrollment with a used-up token and the key it
	// was used for got the certificate already issued, again.
	ActEnrollRepeat = "enroll.repeat"
	// ActDeviceCommand: an operator sent a command (Detail: its name).
	ActDeviceCommand = "device.command"
)

// AuditActions lists every audit action, for filters.
var AuditActions = []string{
	ActTokenCreate, ActTokenUse, ActTokenFail, ActTokenRevoke, ActCertIssue, ActCertRenew,
	ActRenewFail, ActDeviceRevoke, ActReprovision, ActServiceIssue, ActOperatorIssue, ActBackup, ActCertAdopt,
	ActEnrollRepeat, ActDeviceCommand,
}

// AuditEvent is one append-only audit record.
type AuditEvent struct {
	Seq      uint64    `json:"seq"` // assigned by the store
	Time     time.Time `json:"time"`
	Action   string    `json:"action"`
	DeviceID string    `json:"device_id,omitempty"`
	Serial   string    `json:"serial,omitempty"`
	TokenID  string    `json:"token_id,omitempty"`
	Remote   string    `json:"remote,omitempty"`
	Detail   string    `json:"detail,omitempty"` // an error code or a short note; never a secret
}

// AuditFilter selects audit events; zero fields match everything.
type AuditFilter struct {
	DeviceID string
	Since    time.Time
	Limit    int // newest Limit events; 0 means 1000
}

// Enrollment is everything one successful enrollment writes, in one transaction.
type Enrollment struct {
	TokenHash [32]byte
	Device    Device // ID, Role (must be RoleDevice), Labels; Serial/NotAfter are taken from Cert
	Cert      Cert
	Remote    string
	Now       time.Time
}

// Renewal is everything one successful renewal writes, in one transaction.
type Renewal struct {
	DeviceID  string
	OldSerial string // certificate that authenticated the request
	Cert      Cert   // the new certificate
	Remote    string
	Now       time.Time
	// Adopt, when set, is the record of the certificate OldSerial names,
	// to be stored if the store has none (ActCertAdopt): a certificate
	// issued after the backup this store was restored from. The caller
	// has checked that the CA issued it within the RestoredWindow.
	Adopt *Cert
}

// Message is one stored telemetry message.
type Message struct {
	DeviceID string    `json:"device_id"`
	Topic    string    `json:"topic"`
	Received time.Time `json:"received"`
	QoS      byte      `json:"qos"`
	Payload  []byte    `json:"-"`
}

// Presence is the last known connection state of a device.
type Presence struct {
	DeviceID string    `json:"device_id"`
	Online   bool      `json:"online"`
	LastSeen time.Time `json:"last_seen,omitzero"`
	Node     string    `json:"node,omitempty"`
}
