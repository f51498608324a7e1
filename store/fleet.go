package store

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"go.etcd.io/bbolt"
)

// certRecord is a Cert as stored: Cert leaves DER out of its JSON.
type certRecord struct {
	Cert
	DER []byte `json:"der,omitempty"`
}

// checked runs fn once in a read transaction and, if that passes, submits it
// to the writer, where it validates again against the state it will change.
// The dry run turns away most bad requests (a flood of unknown tokens, a
// used-up token raced by many devices) without costing their group a
// rollback. fn must return after validating when tx is not writable.
func (db *DB) checked(ctx context.Context, fn txFunc) error {
	if err := db.view(ctx, fn); err != nil {
		return err
	}
	return db.update(ctx, fn)
}

// CreateTokens stores toks in one transaction: all or none. A token whose
// hash or public id is already stored is refused with ErrTokenExists; one
// bound to an id that cannot be bound as asked, as checkBinding says
// (ErrDeviceExists, ErrDeviceRevoked, ErrNotFound); tokens bound to ids
// that usable tokens are already bound to, with a *LiveTokensError
// (ErrTokenLive) naming those. One ActTokenCreate audit event is appended
// per token.
func (db *DB) CreateTokens(ctx context.Context, toks []Token, remote string, now time.Time) error {
	return db.createTokens(ctx, toks, remote, now, false)
}

// ReplaceTokens is CreateTokens, except that the usable tokens already
// bound to the ids of toks are revoked in the same transaction (an
// ActTokenRevoke event each) rather than refused: the operator lost a
// token's secret, or the device it was meant for.
func (db *DB) ReplaceTokens(ctx context.Context, toks []Token, remote string, now time.Time) error {
	return db.createTokens(ctx, toks, remote, now, true)
}

func (db *DB) createTokens(ctx context.Context, toks []Token, remote string, now time.Time, replace bool) error {
	if len(toks) == 0 {
		return nil
	}
	recs := make([]Token, len(toks))
	hashes := make(map[[32]byte]bool, len(toks))
	ids := make(map[string]bool, len(toks))
	bound := make(map[string]bool, len(toks))
	for i, t := range toks {
		switch {
		case t.ID == "":
			return fmt.Errorf("create tokens: empty id: %w", ErrInvalid)
		case t.Hash == [32]byte{}:
			return fmt.Errorf("create tokens: token %s: empty hash: %w", t.ID, ErrInvalid)
		case t.MaxUses < 1:
			return fmt.Errorf("create tokens: token %s: max uses %d: %w", t.ID, t.MaxUses, ErrInvalid)
		case t.Reprovision && t.DeviceID == "":
			return fmt.Errorf("create tokens: token %s: re-provisioning needs a bound id: %w", t.ID, ErrInvalid)
		case hashes[t.Hash] || ids[t.ID]:
			return fmt.Errorf("create tokens: token %s given twice: %w", t.ID, ErrTokenExists)
		case t.DeviceID != "" && bound[t.DeviceID]:
			return fmt.Errorf("create tokens: two tokens bound to %s: %w", t.DeviceID, ErrInvalid)
		}
		hashes[t.Hash], ids[t.ID] = true, true
		if t.DeviceID != "" {
			bound[t.DeviceID] = true
		}
		if t.CreatedAt.IsZero() {
			t.CreatedAt = now
		}
		recs[i] = t
	}
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		tb, ib, devs := tx.Bucket(bucketTokens), tx.Bucket(bucketTokenIDs), tx.Bucket(bucketDevices)
		for _, t := range recs {
			if tb.Get(t.Hash[:]) != nil || ib.Get([]byte(t.ID)) != nil {
				return fmt.Errorf("token %s: %w", t.ID, ErrTokenExists)
			}
			if t.DeviceID == "" {
				continue
			}
			if _, err := checkBinding(devs.Get([]byte(t.DeviceID)), t); err != nil {
				return fmt.Errorf("token %s: device %s: %w", t.ID, t.DeviceID, err)
			}
		}
		// Checked and written in this one transaction: two creates for
		// one id at once cannot both find it free.
		live, err := usableTokens(tx, bound, now)
		if err != nil {
			return err
		}
		if len(live) > 0 && !replace {
			return &LiveTokensError{Tokens: live}
		}
		if !tx.Writable() {
			return nil
		}
		evs := make([]AuditEvent, 0, len(recs)+len(live))
		replacing := make(map[string]string, len(recs)) // bound id → new token's public id
		for _, t := range recs {
			replacing[t.DeviceID] = t.ID
		}
		for _, t := range live {
			t.RevokedAt = now
			if err := putToken(tx, t); err != nil {
				return err
			}
			evs = append(evs, AuditEvent{Time: now, Action: ActTokenRevoke, TokenID: t.ID, DeviceID: t.DeviceID, Remote: remote,
				Detail: "replaced by token " + replacing[t.DeviceID]})
		}
		for _, t := range recs {
			if err := putToken(tx, t); err != nil {
				return err
			}
			if err := ib.Put([]byte(t.ID), t.Hash[:]); err != nil {
				return fmt.Errorf("put token id: %w", err)
			}
			if t.DeviceID != "" {
				if err := tx.Bucket(bucketTokenBound).Put(boundTokenKey(t.DeviceID, t.Hash[:]), nil); err != nil {
					return fmt.Errorf("index token %s: %w", t.ID, err)
				}
			}
			evs = append(evs, AuditEvent{Time: now, Action: ActTokenCreate, TokenID: t.ID, DeviceID: t.DeviceID, Remote: remote})
		}
		return db.appendAudit(tx, evs)
	})
	if err != nil {
		return fmt.Errorf("create tokens: %w", err)
	}
	return nil
}

// usableTokens returns the tokens bound to one of ids that can still
// enroll it (Token.Check, checkBinding), sorted by id. It reads only the
// tokens the bound-token index holds for ids (see tokenindex.go).
func usableTokens(tx *bbolt.Tx, ids map[string]bool, now time.Time) ([]Token, error) {
	devs := tx.Bucket(bucketDevices)
	var out []Token
	for id := range ids {
		for _, h := range boundTokenHashes(tx, id) {
			t, err := getToken(tx, h)
			if errors.Is(err, ErrTokenUnknown) {
				continue // a free token indexed under its label, since pruned
			}
			if err != nil {
				return nil, fmt.Errorf("usable tokens of %s: %w", id, err)
			}
			// The index may hold a free token under a label's value.
			if t.DeviceID != id || t.Check(now) != nil {
				continue
			}
			if _, err := checkBinding(devs.Get([]byte(id)), t); err != nil {
				continue // bound to an id it can no longer enroll: no rival
			}
			out = append(out, t)
		}
	}
	slices.SortFunc(out, func(a, b Token) int {
		return cmp.Or(strings.Compare(a.DeviceID, b.DeviceID), a.CreatedAt.Compare(b.CreatedAt))
	})
	return out, nil
}

// forEachToken calls fn with every stored token, its Hash set.
func forEachToken(tx *bbolt.Tx, fn func(Token)) error {
	return tx.Bucket(bucketTokens).ForEach(func(k, v []byte) error {
		var t Token
		if err := json.Unmarshal(v, &t); err != nil {
			return fmt.Errorf("decode token: %w", err)
		}
		copy(t.Hash[:], k)
		fn(t)
		return nil
	})
}

func putToken(tx *bbolt.Tx, t Token) error {
	return putJSON(tx.Bucket(bucketTokens), t.Hash[:], t)
}

// getToken returns the token stored under hash, or ErrTokenUnknown.
func getToken(tx *bbolt.Tx, hash [32]byte) (Token, error) {
	var t Token
	ok, err := getJSON(tx.Bucket(bucketTokens), hash[:], &t)
	if err != nil {
		return Token{}, err
	}
	if !ok {
		return Token{}, ErrTokenUnknown
	}
	t.Hash = hash
	return t, nil
}

// TokenByHash returns the token whose secret hashes to hash, or ErrTokenUnknown.
func (db *DB) TokenByHash(ctx context.Context, hash [32]byte) (Token, error) {
	var t Token
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		var err error
		t, err = getToken(tx, hash)
		return err
	})
	if err != nil {
		return Token{}, fmt.Errorf("token by hash: %w", err)
	}
	return t, nil
}

// Tokens returns every token, sorted by CreatedAt, then ID.
func (db *DB) Tokens(ctx context.Context) ([]Token, error) {
	var out []Token
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		return forEachToken(tx, func(t Token) { out = append(out, t) })
	})
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	slices.SortFunc(out, func(a, b Token) int {
		return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), cmp.Compare(a.ID, b.ID))
	})
	return out, nil
}

// RevokeToken revokes the token with public id: ErrNotFound if there is
// none, ErrTokenRevoked if it already was. It returns the revoked token.
func (db *DB) RevokeToken(ctx context.Context, id, remote string, now time.Time) (Token, error) {
	var out Token
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		raw := tx.Bucket(bucketTokenIDs).Get([]byte(id))
		if len(raw) != 32 {
			return ErrNotFound
		}
		t, err := getToken(tx, [32]byte(raw))
		if err != nil {
			return err
		}
		if !t.RevokedAt.IsZero() {
			return ErrTokenRevoked
		}
		if !tx.Writable() {
			return nil
		}
		t.RevokedAt = now
		if err := putToken(tx, t); err != nil {
			return err
		}
		out = t
		return db.appendAudit(tx, []AuditEvent{{Time: now, Action: ActTokenRevoke, TokenID: t.ID, DeviceID: t.DeviceID, Remote: remote}})
	})
	if err != nil {
		return Token{}, fmt.Errorf("revoke token %s: %w", id, err)
	}
	return out, nil
}

// checkBinding applies Token.BindingErr to the device stored as rec (nil:
// none), and returns that device when a re-provisioning token may enroll
// it again.
func checkBinding(rec []byte, t Token) (*Device, error) {
	if rec == nil || !t.Reprovision {
		var d *Device
		if rec != nil {
			d = &Device{} // only a re-provisioning token looks inside
		}
		return nil, t.BindingErr(d)
	}
	var d Device
	if err := json.Unmarshal(rec, &d); err != nil {
		return nil, fmt.Errorf("decode device: %w", err)
	}
	if err := t.BindingErr(&d); err != nil {
		return nil, err
	}
	return &d, nil
}

// Enroll applies one enrollment in one transaction after checking the token
// (ErrTokenUnknown, ErrTokenRevoked, ErrTokenExpired, ErrTokenUsed,
// ErrTokenBound) and that the device id is new (ErrDeviceExists), or that
// the token re-provisions it (see Token.Reprovision; ErrDeviceRevoked), and
// that no usable token is bound to the id a free token enrolls (a
// *LiveTokensError, ErrTokenLive): it spends one use of the token, stores
// the device with role RoleDevice and its certificate, and appends
// ActTokenUse and ActCertIssue (and ActReprovision). A re-provisioned
// device keeps its creation time and labels (the token's are added), and
// its other certificates are revoked.
func (db *DB) Enroll(ctx context.Context, e Enrollment) error {
	id := e.Device.ID
	switch {
	case id == "":
		return fmt.Errorf("enroll: empty device id: %w", ErrInvalid)
	case e.Cert.Serial == "":
		return fmt.Errorf("enroll %s: empty serial: %w", id, ErrInvalid)
	case e.Cert.DeviceID != "" && e.Cert.DeviceID != id:
		return fmt.Errorf("enroll %s: certificate is for %s: %w", id, e.Cert.DeviceID, ErrCertMismatch)
	case e.Now.IsZero():
		return fmt.Errorf("enroll %s: zero time: %w", id, ErrInvalid)
	}
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		t, err := getToken(tx, e.TokenHash)
		if err != nil {
			return err
		}
		if err := t.Check(e.Now); err != nil {
			return fmt.Errorf("token %s: %w", t.ID, err)
		}
		if t.DeviceID != "" && t.DeviceID != id {
			return fmt.Errorf("token %s: %w", t.ID, ErrTokenBound)
		}
		var prev *Device // the device re-provisioned
		if rec := tx.Bucket(bucketDevices).Get([]byte(id)); rec != nil {
			if t.DeviceID != id { // a free token's CN
				var d Device
				if json.Unmarshal(rec, &d) == nil && d.Revoked() {
					return ErrIDRevoked
				}
				return ErrDeviceExists
			}
			if prev, err = checkBinding(rec, t); err != nil {
				return err
			}
		} else if t.DeviceID == "" {
			// A free token's CN must not take an id a usable token is
			// bound to: the device that token was minted for would find
			// it unusable only in the field. Checked in this transaction,
			// as at minting, so no token can be bound to id meanwhile.
			live, err := usableTokens(tx, map[string]bool{id: true}, e.Now)
			if err != nil {
				return err
			}
			if len(live) > 0 {
				return &LiveTokensError{Tokens: live}
			}
		}
		if tx.Bucket(bucketCerts).Get([]byte(e.Cert.Serial)) != nil {
			return fmt.Errorf("serial %s: %w", e.Cert.Serial, ErrCertExists)
		}
		if !tx.Writable() {
			return nil
		}
		t.Uses++
		if err := putToken(tx, t); err != nil {
			return err
		}
		d := e.Device
		d.Role = RoleDevice
		d.CreatedAt = e.Now
		if prev != nil {
			d.CreatedAt = prev.CreatedAt
			labels := make(map[string]string, len(prev.Labels)+len(d.Labels))
			maps.Copy(labels, prev.Labels)
			maps.Copy(labels, d.Labels)
			d.Labels = labels
		}
		d.Serial = e.Cert.Serial
		d.NotAfter = e.Cert.NotAfter
		d.LastRenewal = time.Time{}
		d.RevokedAt = time.Time{}
		d.TokenID = t.ID
		if err := putJSON(tx.Bucket(bucketDevices), []byte(id), d); err != nil {
			return err
		}
		// Re-provisioning says the device's key is gone, lost or in other
		// hands: its earlier certificates are revoked, or the old key
		// would go on connecting and renewing for good.
		var superseded []Cert
		if prev != nil {
			if superseded, err = revokeCerts(tx, id, e.Now); err != nil {
				return err
			}
		}
		if err := putCert(tx, id, e.Cert, e.Now); err != nil {
			return err
		}
		evs := []AuditEvent{
			{Time: e.Now, Action: ActTokenUse, DeviceID: id, TokenID: t.ID, Remote: e.Remote},
			{Time: e.Now, Action: ActCertIssue, DeviceID: id, Serial: e.Cert.Serial, TokenID: t.ID, Remote: e.Remote},
		}
		if prev != nil {
			evs = append(evs, AuditEvent{Time: e.Now, Action: ActReprovision, DeviceID: id, Serial: e.Cert.Serial, TokenID: t.ID, Remote: e.Remote,
				Detail: fmt.Sprintf("previous certificate %s; %d certificate(s) revoked: %s", prev.Serial, len(superseded), serialList(superseded))})
		}
		return db.appendAudit(tx, evs)
	})
	if err != nil {
		return fmt.Errorf("enroll %s: %w", id, err)
	}
	return nil
}

// putCert writes a new, unrevoked certificate record of device id and
// indexes it under the device.
func putCert(tx *bbolt.Tx, id string, c Cert, now time.Time) error {
	c.DeviceID = id
	c.RevokedAt = time.Time{}
	if c.IssuedAt.IsZero() {
		c.IssuedAt = now
	}
	if err := putJSON(tx.Bucket(bucketCerts), []byte(c.Serial), certRecord{Cert: c, DER: c.DER}); err != nil {
		return err
	}
	if err := tx.Bucket(bucketDeviceCerts).Put(deviceCertKey(id, c.Serial), nil); err != nil {
		return fmt.Errorf("index cert: %w", err)
	}
	return nil
}

// deviceCertKey is the length of id, id and serial, so that the prefix of one
// id never matches another id that merely starts with it.
func deviceCertKey(id, serial string) []byte {
	k := deviceCertPrefix(id)
	return append(k, serial...)
}

func deviceCertPrefix(id string) []byte {
	k := make([]byte, 0, 4+len(id)+32)
	k = binary.BigEndian.AppendUint32(k, uint32(len(id)))
	return append(k, id...)
}

func getCert(tx *bbolt.Tx, serial string) (Cert, error) {
	var rec certRecord
	ok, err := getJSON(tx.Bucket(bucketCerts), []byte(serial), &rec)
	if err != nil {
		return Cert{}, err
	}
	if !ok {
		return Cert{}, ErrCertUnknown
	}
	rec.Cert.DER = rec.DER
	return rec.Cert, nil
}

func getDevice(tx *bbolt.Tx, id string) (Device, error) {
	var d Device
	ok, err := getJSON(tx.Bucket(bucketDevices), []byte(id), &d)
	if err != nil {
		return Device{}, err
	}
	if !ok {
		return Device{}, ErrNotFound
	}
	return d, nil
}

// Renew records a renewed certificate in one transaction after checking the
// device (ErrNotFound, ErrDeviceRevoked) and the certificate that
// authenticated the request (ErrCertUnknown, ErrCertMismatch, ErrCertRevoked).
// The old certificate stays valid until it expires. An unknown old
// certificate given in r.Adopt is stored first (ActCertAdopt).
func (db *DB) Renew(ctx context.Context, r Renewal) error {
	id := r.DeviceID
	switch {
	case id == "":
		return fmt.Errorf("renew: empty device id: %w", ErrInvalid)
	case r.Cert.Serial == "":
		return fmt.Errorf("renew %s: empty serial: %w", id, ErrInvalid)
	case r.Cert.DeviceID != "" && r.Cert.DeviceID != id:
		return fmt.Errorf("renew %s: new certificate is for %s: %w", id, r.Cert.DeviceID, ErrCertMismatch)
	case r.Now.IsZero():
		return fmt.Errorf("renew %s: zero time: %w", id, ErrInvalid)
	}
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		d, err := getDevice(tx, id)
		if err != nil {
			return err
		}
		if d.Revoked() {
			return ErrDeviceRevoked
		}
		old, err := getCert(tx, r.OldSerial)
		var evs []AuditEvent
		if errors.Is(err, ErrCertUnknown) && r.Adopt != nil && r.Adopt.Serial == r.OldSerial && r.Adopt.DeviceID == id {
			old, err = *r.Adopt, nil
			if tx.Writable() {
				if err := putCert(tx, id, old, r.Now); err != nil {
					return err
				}
			}
			evs = append(evs, AuditEvent{Time: r.Now, Action: ActCertAdopt, DeviceID: id, Serial: old.Serial, Remote: r.Remote,
				Detail: "issued after the backup this store was restored from"})
		}
		if err != nil {
			return fmt.Errorf("serial %s: %w", r.OldSerial, err)
		}
		if old.DeviceID != id {
			return fmt.Errorf("serial %s: %w", r.OldSerial, ErrCertMismatch)
		}
		if old.Revoked() {
			return fmt.Errorf("serial %s: %w", r.OldSerial, ErrCertRevoked)
		}
		if tx.Bucket(bucketCerts).Get([]byte(r.Cert.Serial)) != nil {
			return fmt.Errorf("serial %s: %w", r.Cert.Serial, ErrCertExists)
		}
		if !tx.Writable() {
			return nil
		}
		if err := putCert(tx, id, r.Cert, r.Now); err != nil {
			return err
		}
		d.Serial = r.Cert.Serial
		d.NotAfter = r.Cert.NotAfter
		d.LastRenewal = r.Now
		if err := putJSON(tx.Bucket(bucketDevices), []byte(id), d); err != nil {
			return err
		}
		evs = append(evs, AuditEvent{Time: r.Now, Action: ActCertRenew, DeviceID: id, Serial: r.Cert.Serial, Remote: r.Remote, Detail: "from " + r.OldSerial})
		return db.appendAudit(tx, evs)
	})
	if err != nil {
		return fmt.Errorf("renew %s: %w", id, err)
	}
	return nil
}

// CreateIdentity stores a service or operator identity and its first
// certificate (RoleDevice is refused with ErrInvalid: devices enroll), and
// appends ActServiceIssue (ActOperatorIssue for an operator).
func (db *DB) CreateIdentity(ctx context.Context, d Device, c Cert, remote string, now time.Time) error {
	id := d.ID
	switch {
	case id == "":
		return fmt.Errorf("create identity: empty id: %w", ErrInvalid)
	case d.Role != RoleService && d.Role != RoleOperator:
		return fmt.Errorf("create identity %s: role %q: %w", id, d.Role, ErrInvalid)
	case c.Serial == "":
		return fmt.Errorf("create identity %s: empty serial: %w", id, ErrInvalid)
	case c.DeviceID != "" && c.DeviceID != id:
		return fmt.Errorf("create identity %s: certificate is for %s: %w", id, c.DeviceID, ErrCertMismatch)
	}
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketDevices).Get([]byte(id)) != nil {
			return ErrDeviceExists
		}
		// The token's device would find the name taken only in the field.
		live, err := usableTokens(tx, map[string]bool{id: true}, now)
		if err != nil {
			return err
		}
		if len(live) > 0 {
			return &LiveTokensError{Tokens: live}
		}
		if tx.Bucket(bucketCerts).Get([]byte(c.Serial)) != nil {
			return fmt.Errorf("serial %s: %w", c.Serial, ErrCertExists)
		}
		if !tx.Writable() {
			return nil
		}
		rec := d
		rec.CreatedAt = now
		rec.Serial = c.Serial
		rec.NotAfter = c.NotAfter
		rec.LastRenewal = time.Time{}
		rec.RevokedAt = time.Time{}
		if err := putJSON(tx.Bucket(bucketDevices), []byte(id), rec); err != nil {
			return err
		}
		if err := putCert(tx, id, c, now); err != nil {
			return err
		}
		act := ActServiceIssue
		if d.Role == RoleOperator {
			act = ActOperatorIssue
		}
		return db.appendAudit(tx, []AuditEvent{{Time: now, Action: act, DeviceID: id, Serial: c.Serial, Remote: remote, Detail: string(d.Role)}})
	})
	if err != nil {
		return fmt.Errorf("create identity %s: %w", id, err)
	}
	return nil
}

// RevokeDevice revokes identity id and every certificate of it not yet
// revoked, and returns those certificates (ErrNotFound, ErrDeviceRevoked).
func (db *DB) RevokeDevice(ctx context.Context, id, remote string, now time.Time) ([]Cert, error) {
	var revoked []Cert
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		d, err := getDevice(tx, id)
		if err != nil {
			return err
		}
		if d.Revoked() {
			return ErrDeviceRevoked
		}
		if !tx.Writable() {
			return nil
		}
		out, ev, err := revokeIdentity(tx, id, d, remote, now)
		if err != nil {
			return err
		}
		revoked = out // assigned, not appended: this function may run twice
		return db.appendAudit(tx, []AuditEvent{ev})
	})
	if err != nil {
		return nil, fmt.Errorf("revoke device %s: %w", id, err)
	}
	return revoked, nil
}

// DeviceRevocation is what RevokeDevices did to one identity.
type DeviceRevocation struct {
	ID string
	// Certs are the certificates revoked now; none when the identity
	// was already revoked.
	Certs []Cert
	// Before is when the identity had already been revoked, by an
	// earlier request; zero if this one revoked it.
	Before time.Time
}

// UnknownIDsError refuses a RevokeDevices request naming identities the
// store never had (ErrNotFound).
type UnknownIDsError struct{ IDs []string }

func (e *UnknownIDsError) Error() string {
	return fmt.Sprintf("%d unknown id(s): %s", len(e.IDs), strings.Join(e.IDs, " "))
}

func (e *UnknownIDsError) Unwrap() error { return ErrNotFound }

// RevokeDevices revokes the identities ids as RevokeDevice does each, in
// one transaction: all or nothing, one audit event per identity revoked.
// If any id is unknown, nothing is revoked (*UnknownIDsError, naming them
// all). An identity already revoked is not refused but reported as such
// (DeviceRevocation.Before), so that a list can be revoked again after an
// interrupted run. The result has one entry per distinct id, in the order
// of ids; a repeated id counts once.
func (db *DB) RevokeDevices(ctx context.Context, ids []string, remote string, now time.Time) ([]DeviceRevocation, error) {
	ids = distinct(ids)
	var result []DeviceRevocation
	err := db.checked(ctx, func(tx *bbolt.Tx) error {
		devs := make([]Device, len(ids))
		var unknown []string
		for i, id := range ids {
			d, err := getDevice(tx, id)
			switch {
			case errors.Is(err, ErrNotFound):
				unknown = append(unknown, id)
			case err != nil:
				return err
			}
			devs[i] = d
		}
		if len(unknown) > 0 {
			return &UnknownIDsError{IDs: unknown}
		}
		if !tx.Writable() {
			return nil
		}
		out := make([]DeviceRevocation, len(ids))
		var evs []AuditEvent
		for i, d := range devs {
			out[i].ID = ids[i]
			if d.Revoked() {
				out[i].Before = d.RevokedAt
				continue
			}
			certs, ev, err := revokeIdentity(tx, ids[i], d, remote, now)
			if err != nil {
				return err
			}
			out[i].Certs = certs
			evs = append(evs, ev)
		}
		result = out // assigned, not appended: this function may run twice
		return db.appendAudit(tx, evs)
	})
	if err != nil {
		return nil, fmt.Errorf("revoke %d device(s): %w", len(ids), err)
	}
	return result, nil
}

// distinct returns ids without repeats, in the order of first mention.
func distinct(ids []string) []string {
	seen := make(map[string]bool, len(ids))
	out := make([]string, 0, len(ids))
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

// revokeIdentity revokes identity id, stored as d and not revoked, and
// every certificate of it not yet revoked; it returns those and the audit
// event to append.
func revokeIdentity(tx *bbolt.Tx, id string, d Device, remote string, now time.Time) ([]Cert, AuditEvent, error) {
	d.RevokedAt = now
	if err := putJSON(tx.Bucket(bucketDevices), []byte(id), d); err != nil {
		return nil, AuditEvent{}, err
	}
	// Serial is the current certificate; earlier ones still valid
	// (after a renewal) are revoked too.
	out, err := revokeCerts(tx, id, now)
	if err != nil {
		return nil, AuditEvent{}, err
	}
	detail := fmt.Sprintf("%d certificate(s) revoked: %s", len(out), serialList(out))
	return out, AuditEvent{Time: now, Action: ActDeviceRevoke, DeviceID: id, Serial: d.Serial, Remote: remote, Detail: detail}, nil
}

// revokeCerts revokes every certificate of identity id not yet revoked and
// returns those.
func revokeCerts(tx *bbolt.Tx, id string, now time.Time) ([]Cert, error) {
	var serials []string
	prefix := deviceCertPrefix(id)
	c := tx.Bucket(bucketDeviceCerts).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		serials = append(serials, string(k[len(prefix):]))
	}
	var out []Cert
	for _, s := range serials {
		cert, err := getCert(tx, s)
		if err != nil {
			return nil, fmt.Errorf("indexed serial %s: %w", s, err)
		}
		if cert.Revoked() {
			continue
		}
		cert.RevokedAt = now
		if err := putJSON(tx.Bucket(bucketCerts), []byte(s), certRecord{Cert: cert, DER: cert.DER}); err != nil {
			return nil, err
		}
		if err := putRevocation(tx, cert); err != nil {
			return nil, err
		}
		out = append(out, cert)
	}
	return out, nil
}

func serialList(certs []Cert) string {
	all := make([]string, len(certs))
	for i, c := range certs {
		all[i] = c.Serial
	}
	return strings.Join(all, " ")
}

// Device returns identity id, or ErrNotFound.
func (db *DB) Device(ctx context.Context, id string) (Device, error) {
	var d Device
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		var err error
		d, err = getDevice(tx, id)
		return err
	})
	if err != nil {
		return Device{}, fmt.Errorf("device %s: %w", id, err)
	}
	return d, nil
}

// Devices returns every identity, sorted by ID.
func (db *DB) Devices(ctx context.Context) ([]Device, error) {
	var out []Device
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(_, v []byte) error {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode device: %w", err)
			}
			out = append(out, d)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	return out, nil // bbolt iterates in byte order of the ids
}

// Cert returns the certificate record with serial, or ErrCertUnknown.
func (db *DB) Cert(ctx context.Context, serial string) (Cert, error) {
	var c Cert
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		var err error
		c, err = getCert(tx, serial)
		return err
	})
	if err != nil {
		return Cert{}, fmt.Errorf("cert %s: %w", serial, err)
	}
	return c, nil
}

// DeviceCerts returns the certificate records kept for identity id (see
// PruneCerts), newest first, or ErrNotFound.
func (db *DB) DeviceCerts(ctx context.Context, id string) ([]Cert, error) {
	var out []Cert
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		if _, err := getDevice(tx, id); err != nil {
			return err
		}
		prefix := deviceCertPrefix(id)
		c := tx.Bucket(bucketDeviceCerts).Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			cert, err := getCert(tx, string(k[len(prefix):]))
			if err != nil {
				return fmt.Errorf("indexed serial %s: %w", k[len(prefix):], err)
			}
			out = append(out, cert)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("certificates of %s: %w", id, err)
	}
	slices.SortFunc(out, func(a, b Cert) int {
		return cmp.Or(b.IssuedAt.Compare(a.IssuedAt), strings.Compare(b.Serial, a.Serial))
	})
	return out, nil
}

// RevokedCerts returns every revoked certificate, sorted by serial.
func (db *DB) RevokedCerts(ctx context.Context) ([]Cert, error) {
	var out []Cert
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketRevoked).ForEach(func(k, _ []byte) error {
			c, err := getCert(tx, string(k))
			if err != nil {
				return fmt.Errorf("revoked serial %s: %w", k, err)
			}
			out = append(out, c)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list revoked certs: %w", err)
	}
	return out, nil
}
