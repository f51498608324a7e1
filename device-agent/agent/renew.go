package agent

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// renewMode is what the renewal schedule asks for at a given moment.
type renewMode int

const (
	modeWait        renewMode = iota // not due yet
	modeMTLS                         // due, certificate still valid: renew over mTLS
	modeExpired                      // expired within the grace: renew with a signed proof
	modeNeedsToken                   // expired beyond the grace: only a new token helps
	modeClockBehind                  // now is before NotBefore: the clock is wrong
)

func (m renewMode) String() string {
	return [...]string{"wait", "mtls", "expired", "needs_token", "clock_behind"}[m]
}

// renewalTime is start + 2/3 of the lifetime ± 5 % of the lifetime; r in
// [0, 1) picks the point in the jitter window, so a fleet enrolled at once
// does not renew at once.
func renewalTime(start, notAfter time.Time, r float64) time.Time {
	life := notAfter.Sub(start)
	jitter := time.Duration((2*r - 1) * 0.05 * float64(life))
	return start.Add(life*2/3 + jitter)
}

// planRenewal decides what to do at now for a certificate valid from
// notBefore to notAfter, and when (for modeWait: the renewal time).
//
// The lifetime counts from NotBefore, or from received (when the agent got
// the certificate, zero if unknown) if that is later: servers backdate
// NotBefore against clock skew, and with a short lifetime the 2/3 point
// could already be past on arrival, renewing in a tight loop.
func planRenewal(now, notBefore, notAfter, received time.Time, grace time.Duration, r float64) (renewMode, time.Time) {
	switch {
	case now.Before(notBefore):
		return modeClockBehind, notBefore
	case !now.Before(notAfter.Add(grace)):
		return modeNeedsToken, now
	case !now.Before(notAfter):
		return modeExpired, now
	}
	start := notBefore
	if received.After(start) && received.Before(notAfter) {
		start = received
	}
	if at := renewalTime(start, notAfter, r); now.Before(at) {
		return modeWait, at
	}
	return modeMTLS, now
}

// backoff is the wait before retry number attempt (0-based): min doubled per
// attempt, capped at max, then jittered down by up to half ("equal jitter"),
// so it stays in [d/2, d] and never tight-loops.
func backoff(attempt int, min, max time.Duration, r float64) time.Duration {
	d := max
	if attempt < 62 {
		if x := min << attempt; x > 0 && x < max {
			d = x
		}
	}
	return d/2 + time.Duration(r*float64(d/2))
}

// proofSignature signs the CSR with the old key for renewal after expiry:
// ECDSA (ASN.1) over SHA-256 of the CSR DER; Ed25519 over the DER itself.
func proofSignature(old crypto.Signer, csrDER []byte) (string, error) {
	var sig []byte
	var err error
	if _, ok := old.(ed25519.PrivateKey); ok {
		sig, err = old.Sign(rand.Reader, csrDER, crypto.Hash(0))
	} else {
		sum := sha256.Sum256(csrDER)
		sig, err = old.Sign(rand.Reader, sum[:], crypto.SHA256)
	}
	if err != nil {
		return "", fmt.Errorf("sign renewal proof: %w", err)
	}
	return base64.StdEncoding.EncodeToString(sig), nil
}

// requestRenewal asks the server for a certificate for a new key. With
// expired false it authenticates with the current certificate (mTLS); if the
// server refuses that certificate during the handshake it falls back, like
// with expired true, to the proof signed by the old key.
func requestRenewal(ctx context.Context, cfg Config, serverURL string, cur *identity, expired bool) (*identity, string, error) {
	base, err := parseServerURL(serverURL)
	if err != nil {
		return nil, "", err
	}
	key, err := newKey()
	if err != nil {
		return nil, "", err
	}
	csrPEM, csrDER, err := makeCSR(key, cur.deviceID)
	if err != nil {
		return nil, "", err
	}
	var resp certResponse
	if !expired {
		c := newServerClient(base, trustedTLS(cur.roots, base.Hostname(), &cur.cert, cfg.Now), cfg)
		_, err = c.do(ctx, http.MethodPost, "/v1/renew", "application/pkcs10", nil, csrPEM, &resp)
		if err == nil {
			c.warnSkew()
			return acceptCertResponse(key, resp, cur.deviceID)
		}
		if !authRejected(err) {
			return nil, "", caAdvice(fmt.Errorf("renew: %w", err))
		}
		cfg.Logger.Warn().Err(err).Msg("server refused the certificate; trying renewal after expiry")
	}
	sig, err := proofSignature(cur.key, csrDER)
	if err != nil {
		return nil, "", err
	}
	body, err := json.Marshal(map[string]string{
		"csr":         string(csrPEM),
		"certificate": string(certPEMOf(cur.leaf)), // the leaf alone: the server wants one block
		"signature":   sig,
	})
	if err != nil {
		return nil, "", fmt.Errorf("encode renewal: %w", err)
	}
	c := newServerClient(base, trustedTLS(cur.roots, base.Hostname(), nil, cfg.Now), cfg)
	if _, err := c.do(ctx, http.MethodPost, "/v1/renew", "application/json", nil, body, &resp); err != nil {
		return nil, "", caAdvice(fmt.Errorf("renew after expiry: %w", err))
	}
	c.warnSkew()
	return acceptCertResponse(key, resp, cur.deviceID)
}

// errClockAhead is reported when a certificate the server has just issued
// is already expired by the local clock.
var errClockAhead = errors.New("system clock is later than the expiry of the certificate the server has just issued; waiting for time sync")

// errClockBehind is returned when the local clock is before the current
// certificate's NotBefore.
var errClockBehind = errors.New("system clock is earlier than the certificate's NotBefore; waiting for time sync")

// renewAndCommit renews the identity on disk under identity.lock and writes
// the new key pair only once the new certificate is in hand; on any failure
// the old pair stays. If the identity on disk differs from have (another
// process renewed meanwhile), that one is returned without a request.
func renewAndCommit(ctx context.Context, cfg Config, ss *stateStore, have *identity) (*identity, error) {
	dir := cfg.StateDir
	l, err := lock(ctx, filepath.Join(dir, identityLock))
	if err != nil {
		return nil, err
	}
	defer l.unlock()
	cur, err := loadIdentity(dir, cfg.Logger)
	if err != nil {
		return nil, err
	}
	if have != nil && cur.serial() != have.serial() {
		return cur, nil
	}
	st, err := readState(dir)
	if errors.Is(err, ErrNotEnrolled) {
		err = errStateMissing // the key pair is there: not a fresh device
	}
	if err == nil {
		err = st.checkURLs(dir)
	}
	if err != nil {
		return nil, err
	}
	now := cfg.Now()
	mode, _ := planRenewal(now, cur.leaf.NotBefore, cur.leaf.NotAfter, time.Time{}, cfg.Grace, 0.5)
	if mode == modeClockBehind {
		return nil, errClockBehind
	}
	id, broker, err := requestRenewal(ctx, cfg, st.ServerURL, cur, mode == modeExpired || mode == modeNeedsToken)
	if err != nil {
		return nil, err
	}
	if err := commitIdentity(dir, id); err != nil {
		return nil, err
	}
	id.received = now
	err = ss.update(ctx, func(s *State) {
		s.DeviceID = id.deviceID
		s.BrokerURL = broker
		s.LastRenewal = now
		s.NotAfter = id.leaf.NotAfter
		s.Condition = ""
	})
	if err != nil {
		// The new pair is committed; a stale state.json only shows old dates.
		cfg.Logger.Warn().Err(err).Msg("save state after renewal")
	}
	cfg.Logger.Info().Str("device_id", id.deviceID).Str("serial", id.serial()).Time("not_after", id.leaf.NotAfter).Msg("certificate renewed")
	return id, nil
}

// RenewResult describes the certificate after Renew.
type RenewResult struct {
	DeviceID string
	NotAfter time.Time
}

// Renew renews the certificate now. A running agent picks up the new
// certificate within Config.CertCheckInterval and reconnects with it.
func Renew(ctx context.Context, cfg Config) (RenewResult, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return RenewResult{}, err
	}
	if err := requireStateDir(cfg.StateDir); err != nil {
		return RenewResult{}, err
	}
	if err := checkStateOwner(cfg.StateDir, "renew", os.Geteuid()); err != nil {
		return RenewResult{}, err
	}
	id, err := renewAndCommit(ctx, cfg, &stateStore{dir: cfg.StateDir}, nil)
	if err != nil {
		return RenewResult{}, explain(err)
	}
	return RenewResult{DeviceID: id.deviceID, NotAfter: id.leaf.NotAfter}, nil
}

// failure is how the agent reacts to a failed renewal.
type failure int

const (
	failTransient   failure = iota // retry with exponential backoff
	failClock                      // wait for time sync
	failRevoked                    // long backoff, report
	failNeedsToken                 // long backoff, report: a new token is needed
	failCertUnknown                // long backoff, report: the server does not know the certificate
	failSuperseded                 // long backoff, report: the device was re-provisioned with another key
)

// blockedConditions are the conditions the failures that no retry mends
// put the agent in, until the long backoff ends or a person acts.
var blockedConditions = map[failure]string{
	failRevoked:     CondRevoked,
	failNeedsToken:  CondNeedsToken,
	failCertUnknown: CondCertUnknown,
	failSuperseded:  CondSuperseded,
}

func classify(err error) failure {
	var ce *ClockError
	if errors.As(err, &ce) || errors.Is(err, errClockBehind) {
		return failClock
	}
	var se *ServerError
	if errors.As(err, &se) {
		switch {
		case se.Code == codeCertRevoked:
			// The server revoked this certificate but not its device:
			// re-provisioning gave the id a new key.
			return failSuperseded
		case se.Revoked():
			return failRevoked
		case se.Code == codeCertExpired:
			return failNeedsToken
		case se.Code == codeCertInvalid:
			// The server's CA verified the certificate for TLS, yet
			// the server has no record of it: no retry brings it back.
			return failCertUnknown
		}
	}
	return failTransient
}

// explain adds what a person should do to errors that need one.
func explain(err error) error {
	switch classify(err) {
	case failRevoked:
		return fmt.Errorf("%w: this device was revoked; %s", err, adviceRevoked)
	case failNeedsToken:
		return fmt.Errorf("%w: the certificate expired beyond the renewal grace; %s", err, adviceNeedsToken)
	case failCertUnknown:
		return fmt.Errorf("%w: %s", err, adviceCertUnknown)
	case failSuperseded:
		return fmt.Errorf("%w: this certificate was revoked when its device was re-provisioned with a new key; %s", err, adviceSuperseded)
	}
	return err
}
