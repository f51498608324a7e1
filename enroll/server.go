package enroll

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"mime"
	"net"
	"net/http"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/store"
)

// Store is what the enrollment endpoint needs from fleet state.
type Store interface {
	TokenByHash(ctx context.Context, hash [32]byte) (store.Token, error)
	Enroll(ctx context.Context, e store.Enrollment) error
	Renew(ctx context.Context, r store.Renewal) error
	Device(ctx context.Context, id string) (store.Device, error)
	Cert(ctx context.Context, serial string) (store.Cert, error)
	Revocations(ctx context.Context) ([]store.Revocation, error)
	AppendAudit(ctx context.Context, evs ...store.AuditEvent) error
}

// Config configures the enrollment endpoint. Zero values mean the defaults
// named on each field.
type Config struct {
	CA           *CA           // required
	CertLifetime time.Duration // device certificate lifetime; default 30 days
	RenewGrace   time.Duration // how long after expiry a certificate may still renew; default 7 days, NoRenewGrace for none
	// BrokerURL is returned to devices; default "mqtts://<host the device used>:<MQTTPort>".
	BrokerURL string
	MQTTPort  int // default 8883
	// FailureRate and FailureBurst bound failed enrollment and renewal
	// attempts per remote address (a token bucket); defaults 0.2/s and 10.
	FailureRate  float64
	FailureBurst int
	// CRLValidity is how far ahead the CRL's NextUpdate lies. It is long on
	// purpose: a relying party that enforces NextUpdate must never lock the
	// fleet out because the server was down; default 30 days.
	CRLValidity time.Duration
	// RestoredFrom and RestoredAt, when set, say that the store is a
	// backup copy whose snapshot was taken at RestoredFrom and that was
	// first served at RestoredAt (store.RestoredWindow). Certificates the
	// CA issued in between exist without a record. A renewal authenticated
	// by such a certificate, for a device the store knows and has not
	// revoked, adopts it (store.ActCertAdopt) instead of refusing it: the
	// devices that renewed after the backup come back by themselves.
	// Default: not a restored store; unknown certificates are refused.
	RestoredFrom, RestoredAt time.Time
	// Observe, when set, is called once per enrollment or renewal request
	// (EST included) with op OpEnroll or OpRenew and the outcome: "ok" or
	// the public error code, e.g. "rate_limited". It feeds metrics and
	// must not block. Default none.
	Observe func(op, result string)
	// OnReprovision, when set, runs after a re-provisioning enrollment of
	// device id was committed, which revoked the device's earlier
	// certificates, and the CRL regenerated: it closes their live
	// sessions. Default none (they end at the broker's next check).
	OnReprovision func(ctx context.Context, id string)
	Logger        zerolog.Logger   // default zerolog.Nop()
	Now           func() time.Time // default time.Now
}

// Operations reported to Config.Observe.
const (
	OpEnroll = "enroll"
	OpRenew  = "renew"
)

// ResultRepeat is the outcome reported to Config.Observe for an enrollment
// answered with the certificate it had already issued (see
// repeatEnrollment); others are "ok" or a public error code.
const ResultRepeat = "repeat"

// NoRenewGrace as Config.RenewGrace turns renewal after expiry off (zero
// means the default).
const NoRenewGrace time.Duration = -1

// MaxBodySize bounds every request body.
const MaxBodySize = 64 << 10

// maxHeaderValue bounds a single header value; longer ones are refused with
// a JSON error before any work is done.
const maxHeaderValue = 8 << 10

// Handler serves the enrollment API: /v1/ca, /v1/enroll, /v1/renew, /v1/crl,
// and EST (RFC 7030) under /.well-known/est/.
type Handler struct {
	cfg     Config
	st      Store
	log     zerolog.Logger
	mux     *http.ServeMux
	limiter *failureLimiter

	mqttPort atomic.Int64

	crlMu sync.Mutex
	crl   []byte
	// crlFrom and crlUntil are crl's ThisUpdate and NextUpdate.
	crlFrom, crlUntil time.Time

	// Rebuilds of the CRL run one at a time, and a call is answered by
	// any rebuild that began after it was made (see RefreshCRL).
	rebuild  sync.Mutex
	genMu    sync.Mutex
	asked    uint64 // calls made
	built    uint64 // calls covered by the last rebuild
	builtErr error  // its outcome
}

// NewHandler returns the enrollment handler.
func NewHandler(cfg Config, st Store) (*Handler, error) {
	if cfg.CA == nil {
		return nil, errors.New("enroll: config needs a CA")
	}
	if st == nil {
		return nil, errors.New("enroll: config needs a store")
	}
	if cfg.CertLifetime == 0 {
		cfg.CertLifetime = 30 * 24 * time.Hour
	}
	// Below 10 s a device could not renew and reconnect before expiry.
	// Lifetimes of seconds serve tests of scheduled renewal end to end.
	if cfg.CertLifetime < 10*time.Second {
		return nil, fmt.Errorf("enroll: certificate lifetime %v is shorter than 10s", cfg.CertLifetime)
	}
	switch {
	case cfg.RenewGrace == 0:
		cfg.RenewGrace = 7 * 24 * time.Hour
	case cfg.RenewGrace == NoRenewGrace:
		cfg.RenewGrace = 0
	case cfg.RenewGrace < 0:
		return nil, fmt.Errorf("enroll: negative renewal grace %v", cfg.RenewGrace)
	}
	if cfg.MQTTPort == 0 {
		cfg.MQTTPort = 8883
	}
	if cfg.FailureRate == 0 {
		cfg.FailureRate = 0.2
	}
	if cfg.FailureBurst == 0 {
		cfg.FailureBurst = 10
	}
	if cfg.CRLValidity == 0 {
		cfg.CRLValidity = 30 * 24 * time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	h := &Handler{
		cfg:     cfg,
		st:      st,
		log:     cfg.Logger,
		mux:     http.NewServeMux(),
		limiter: newFailureLimiter(cfg.FailureRate, cfg.FailureBurst, cfg.Now),
	}
	h.mqttPort.Store(int64(cfg.MQTTPort))
	h.mux.HandleFunc("GET /v1/ca", h.serveCA)
	h.mux.HandleFunc("GET /v1/crl", h.serveCRL)
	h.mux.HandleFunc("POST /v1/enroll", h.serveEnroll)
	h.mux.HandleFunc("POST /v1/renew", h.serveRenew)
	if err := h.registerEST(); err != nil {
		return nil, err
	}
	return h, nil
}

// SetMQTTPort changes the port of the broker URL handed to devices, for a
// broker bound to an ephemeral port.
func (h *Handler) SetMQTTPort(port int) { h.mqttPort.Store(int64(port)) }

// Handle registers another handler on the same mux (EST lives beside /v1).
func (h *Handler) Handle(pattern string, handler http.Handler) { h.mux.Handle(pattern, handler) }

// StrictTransportSecurity is the Strict-Transport-Security value of every
// HTTPS answer: a browser that has seen it reaches this host only over
// HTTPS for a year, so that a network attacker cannot downgrade it to
// plain HTTP. Not includeSubDomains: fleetmq does not own its domain's
// other hosts.
const StrictTransportSecurity = "max-age=31536000"

// ServeHTTP is the enrollment listener's only handler, so what it sets
// here is on every answer, errors included.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.TLS != nil {
		// RFC 6797 section 7.2: never over plain HTTP, where a browser
		// ignores it (only tests get here without TLS).
		w.Header().Set("Strict-Transport-Security", StrictTransportSecurity)
	}
	for _, vs := range r.Header {
		for _, v := range vs {
			if len(v) > maxHeaderValue {
				h.writeError(w, r, Errorf(CodeHeaderTooLarge, "a request header is longer than %d bytes", maxHeaderValue))
				return
			}
		}
	}
	// The mux would redirect a path with dot segments or doubled slashes to
	// its clean form, with an empty body; no client needs that, so such a
	// path is refused like any unknown one.
	if p := r.URL.Path; path.Clean(p) != p {
		h.writeError(w, r, Errorf(CodeNotFound, "no such endpoint"))
		return
	}
	// The mux answers unknown paths and methods in plain text; keep every
	// answer in the one JSON error format.
	if _, pattern := h.mux.Handler(r); pattern == "" {
		if allow := h.allowedMethods(r); len(allow) > 0 {
			// RFC 9110 section 15.5.6: a 405 lists the methods the path has.
			w.Header().Set("Allow", strings.Join(allow, ", "))
			h.writeError(w, r, Errorf(CodeMethod, "method %s not allowed here; use %s",
				clientText(r.Method, 16), strings.Join(allow, " or ")))
		} else {
			h.writeError(w, r, Errorf(CodeNotFound, "no such endpoint"))
		}
		return
	}
	h.mux.ServeHTTP(w, r)
}

// probeMethods are the methods allowedMethods tries: every method a route
// could be registered for. The mux serves HEAD wherever it serves GET.
var probeMethods = []string{
	http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete,
}

// allowedMethods returns the methods the mux serves on r's path, none for
// an unknown path.
func (h *Handler) allowedMethods(r *http.Request) []string {
	var allow []string
	for _, m := range probeMethods {
		// A shallow copy: the mux reads only the method, host and path.
		probe := r.WithContext(r.Context())
		probe.Method = m
		if _, p := h.mux.Handler(probe); p != "" {
			allow = append(allow, m)
		}
	}
	return allow
}

func (h *Handler) serveCA(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/x-pem-file")
	w.Write(h.cfg.CA.ChainPEM())
}

func (h *Handler) serveCRL(w http.ResponseWriter, r *http.Request) {
	der, err := h.currentCRL(r.Context())
	if err != nil {
		h.writeError(w, r, &Error{Code: CodeUnavailable, Message: "CRL not available", Err: err})
		return
	}
	w.Header().Set("Content-Type", "application/pkix-crl")
	w.Write(der)
}

func (h *Handler) currentCRL(ctx context.Context) ([]byte, error) {
	h.crlMu.Lock()
	der, from, until := h.crl, h.crlFrom, h.crlUntil
	h.crlMu.Unlock()
	// The daily refresh counts on a monotonic timer, which a wall clock
	// jump passes by (NTP setting a gateway's clock weeks ahead): a CRL
	// the clock says is not valid is signed anew, not served expired.
	if now := h.cfg.Now(); der != nil && !now.Before(from) && now.Before(until) {
		return der, nil
	}
	if err := h.RefreshCRL(ctx); err != nil {
		return nil, err
	}
	h.crlMu.Lock()
	defer h.crlMu.Unlock()
	return h.crl, nil
}

// RefreshCRL regenerates the CRL from the store. Call it after every
// revocation and periodically, well before CRLValidity runs out.
//
// Rebuilds run one at a time, so an older CRL never replaces a newer one,
// and calls made while one runs share the next: it reads the store after
// all of them. A rebuild reads the revocation index and signs every entry
// (about 20 ms at 5,000, see BENCHMARKS.md), so revocations in bulk do not
// pay one each.
func (h *Handler) RefreshCRL(ctx context.Context) error {
	h.genMu.Lock()
	h.asked++
	mine := h.asked
	h.genMu.Unlock()
	h.rebuild.Lock()
	defer h.rebuild.Unlock()
	h.genMu.Lock()
	if h.built >= mine {
		err := h.builtErr
		h.genMu.Unlock()
		return err
	}
	covers := h.asked
	h.genMu.Unlock()
	// Shared: one caller giving up must not fail the others.
	err := h.rebuildCRL(context.WithoutCancel(ctx))
	h.genMu.Lock()
	h.built, h.builtErr = covers, err
	h.genMu.Unlock()
	return err
}

func (h *Handler) rebuildCRL(ctx context.Context) error {
	revoked, err := h.st.Revocations(ctx)
	if err != nil {
		return fmt.Errorf("enroll: list revoked certificates: %w", err)
	}
	// The CRL number only has to grow; nanoseconds grow across restarts too.
	number := big.NewInt(h.cfg.Now().UnixNano())
	crl, err := h.cfg.CA.CRL(revoked, number, h.cfg.CRLValidity)
	if err != nil {
		return fmt.Errorf("enroll: sign CRL: %w", err)
	}
	h.crlMu.Lock()
	h.crl, h.crlFrom, h.crlUntil = crl.DER, crl.ThisUpdate, crl.NextUpdate
	h.crlMu.Unlock()
	return nil
}

// Response is the JSON answer to a successful enrollment or renewal.
type Response struct {
	DeviceID    string    `json:"device_id"`
	Certificate string    `json:"certificate"` // PEM leaf
	CA          string    `json:"ca"`          // PEM chain, issuing CA first
	NotAfter    time.Time `json:"not_after"`
	BrokerURL   string    `json:"broker_url"`
}

func (h *Handler) serveEnroll(w http.ResponseWriter, r *http.Request) {
	h.attempt(w, r, OpEnroll, "v1", func(remote string) (*x509.Certificate, store.AuditEvent, error) {
		return h.enroll(r, remote)
	}, func(cert *x509.Certificate, repeat bool) {
		status := http.StatusCreated
		if repeat {
			status = http.StatusOK // nothing was created
		}
		h.writeCert(w, r, status, cert)
	})
}

// attempt is the frame of every enrollment and renewal, /v1 and EST alike:
// the per-address limit on failures, the outcome reported to Observe, the
// audit record of a failure and the log line of a success. do returns the
// audit fields that identify the attempt (token id, device id). Each must
// come from the server, never from the client unverified: a failure record
// is written for anyone who connects, and must not say more than is known.
//
// A request the limiter refuses is not audited: the limiter is what keeps
// a flood of failures out of the audit log.
func (h *Handler) attempt(w http.ResponseWriter, r *http.Request, op, via string,
	do func(remote string) (*x509.Certificate, store.AuditEvent, error), write func(cert *x509.Certificate, repeat bool)) {
	remote := remoteHost(r)
	if wait, ok := h.limiter.allowed(remote); !ok {
		h.observe(op, errRateLimited)
		h.writeError(w, r, rateLimited(wait))
		return
	}
	cert, ev, err := do(remote)
	if repeat := err == nil && ev.Action == store.ActEnrollRepeat; repeat {
		// A certificate sent again: counted apart, and against the
		// address like a failure, so that a spent token and its key
		// cannot be replayed without bound.
		if h.cfg.Observe != nil {
			h.cfg.Observe(op, ResultRepeat)
		}
		h.limiter.failed(remote)
		h.log.Info().Str("device", cert.Subject.CommonName).Str("serial", SerialHex(cert.SerialNumber)).
			Str("token_id", ev.TokenID).Str("remote", remote).Str("via", via).Msg("enrollment repeated: the certificate already issued was sent again")
		write(cert, true)
		return
	}
	if err != nil {
		e := AsError(err)
		if via == "est" && e.Code == CodeTokenMissing {
			// Clients that send credentials only once challenged (RFC
			// 7030 §3.2.3, HTTP Basic) start every enrollment this way:
			// not a failure to count or audit. It costs the server no
			// lookup and no parsing.
			h.observe(op, e)
			h.writeError(w, r, e)
			return
		}
		if e.Code != CodeInternal && e.Code != CodeUnavailable {
			// Refused now if the address ran out of failures while this
			// request was under way: concurrent requests, above all ones
			// holding back their bodies, all passed the check on arrival.
			if wait, ok := h.limiter.failed(remote); !ok {
				h.observe(op, errRateLimited)
				h.writeError(w, r, rateLimited(wait))
				return
			}
		}
		h.observe(op, e)
		ev.Action, ev.Remote = store.ActTokenFail, remote
		if op == OpRenew {
			ev.Action = store.ActRenewFail
		}
		h.fail(w, r, e, ev)
		return
	}
	h.observe(op, nil)
	msg := "device enrolled"
	if op == OpRenew {
		msg = "certificate renewed"
	}
	h.log.Info().Str("device", cert.Subject.CommonName).Str("serial", SerialHex(cert.SerialNumber)).
		Str("token_id", ev.TokenID).Str("remote", remote).Str("via", via).Msg(msg)
	write(cert, false)
}

// enroll does the work of /v1/enroll. It returns the audit fields that
// identify a failed attempt (see checkToken).
func (h *Handler) enroll(r *http.Request, remote string) (*x509.Certificate, store.AuditEvent, error) {
	secret, err := bearerToken(r)
	if err != nil {
		return nil, store.AuditEvent{}, err
	}
	tok, who, tokErr := h.checkToken(r.Context(), secret)
	spent := spentToken(tok, tokErr)
	if tokErr != nil && !spent {
		return nil, who, tokErr
	}
	if err := csrContentType(r); err != nil {
		return nil, who, err
	}
	body, err := readBody(r)
	if err != nil {
		return nil, who, err
	}
	csr, err := ParseCSR(body)
	if err != nil {
		return nil, who, err
	}
	return h.enrollOrRepeat(r.Context(), tok, tokErr, csr, remote, who)
}

// enrollOrRepeat enrolls csr with tok, unless the request repeats an
// earlier use of tok whose answer was lost (repeatEnrollment): then the
// certificate already issued is sent again, with who.Action set to
// ActEnrollRepeat. A spent token (tokErr) enrolls nothing else.
func (h *Handler) enrollOrRepeat(ctx context.Context, tok store.Token, tokErr error, csr *x509.CertificateRequest, remote string, who store.AuditEvent) (*x509.Certificate, store.AuditEvent, error) {
	if tok.Uses > 0 {
		cert, err := h.repeatEnrollment(ctx, tok, csr, remote, who)
		if err != nil {
			return nil, who, err
		}
		if cert != nil {
			who.Action = store.ActEnrollRepeat
			return cert, who, nil
		}
	}
	if tokErr != nil {
		if errors.Is(tokErr, store.ErrTokenUsed) {
			tokErr = &Error{Code: CodeTokenUsed, Err: tokErr,
				Message: "token has no uses left; a device that enrolled with it and lost the answer gets its certificate by enrolling again with the same key (device-agent does)"}
		}
		return nil, who, tokErr
	}
	cert, err := h.enrollCSR(ctx, tok, csr, remote)
	return cert, who, err
}

// spentToken reports whether err, from checkToken, is about a token that
// did its job: used up (and perhaps expired since). Its enrollment may be
// repeated (repeatEnrollment).
func spentToken(tok store.Token, err error) bool {
	return errors.Is(err, store.ErrTokenUsed) || errors.Is(err, store.ErrTokenExpired) && tok.MaxUses > 0 && tok.Uses >= tok.MaxUses
}

// repeatEnrollment returns the certificate an earlier use of tok issued to
// the key in csr, when the request repeats that use: its answer was lost
// (a cellular link dropping the response after the server committed), and
// without this the device is left with no certificate and its token spent.
// It is the certificate of the device that use enrolled, as long as the
// device has not renewed since, neither is revoked and it has not expired;
// the CSR's signature proves the key and asks for nothing the first
// request did not. Nothing is issued. It returns nil when the request is
// not such a repeat.
func (h *Handler) repeatEnrollment(ctx context.Context, tok store.Token, csr *x509.CertificateRequest, remote string, who store.AuditEvent) (*x509.Certificate, error) {
	id := tok.DeviceID
	switch cn := csr.Subject.CommonName; {
	case id == "":
		id = cn
	case cn != "" && cn != id:
		return nil, nil // the first request could not have asked this
	}
	if ValidateID(id) != nil {
		return nil, nil
	}
	d, err := h.st.Device(ctx, id)
	if err != nil || d.Revoked() || d.Role != store.RoleDevice || d.TokenID != tok.ID || !d.LastRenewal.IsZero() {
		return nil, nil
	}
	rec, err := h.st.Cert(ctx, d.Serial)
	if err != nil || rec.Revoked() || rec.DeviceID != id {
		return nil, nil
	}
	cert, err := x509.ParseCertificate(rec.DER)
	if err != nil || !h.cfg.Now().Before(cert.NotAfter) {
		return nil, nil
	}
	pub, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(csr.PublicKey) {
		return nil, nil
	}
	ev := store.AuditEvent{Time: h.cfg.Now(), Action: store.ActEnrollRepeat, DeviceID: id, Serial: rec.Serial,
		TokenID: who.TokenID, Remote: remote, Detail: "the answer to an earlier enrollment with this token and key, sent again"}
	if err := h.st.AppendAudit(ctx, ev); err != nil {
		return nil, err
	}
	return cert, nil
}

// checkToken checks the shape of a bootstrap token, that it was minted for
// this CA, and that the store has it and it is usable now. It runs before
// the CSR is read: a lookup costs less than parsing and verifying a CSR.
//
// It also returns the audit fields that identify a failed attempt, as soon
// as each is known: the token's public id, computed here, and the device
// id the stored token is bound to, so that `fleetmq audit --device ID`
// shows failed attempts with that device's token. Both come from the
// server; the id a CSR asks for does not go into the record.
func (h *Handler) checkToken(ctx context.Context, secret string) (store.Token, store.AuditEvent, error) {
	tok, err := ParseToken(secret)
	if err != nil {
		return store.Token{}, store.AuditEvent{}, err
	}
	who := store.AuditEvent{TokenID: TokenID(tok.Hash)}
	if tok.CAFingerprint != h.cfg.CA.Fingerprint() {
		return store.Token{}, who, Errorf(CodeTokenUnknown, "token was issued for another CA")
	}
	stored, err := h.st.TokenByHash(ctx, tok.Hash)
	if err != nil {
		return store.Token{}, who, err
	}
	who.DeviceID = stored.DeviceID
	if err := stored.Check(h.cfg.Now()); err != nil {
		// The token goes with the error: a spent one may be repeated
		// (repeatEnrollment).
		return stored, who, err
	}
	return stored, who, nil
}

// enrollCSR trades a usable stored token (checkToken) and a checked CSR for
// a device certificate: the flow shared by /v1/enroll and EST simpleenroll.
// The store checks the token again in the transaction that uses it.
func (h *Handler) enrollCSR(ctx context.Context, stored store.Token, csr *x509.CertificateRequest, remote string) (*x509.Certificate, error) {
	now := h.cfg.Now()
	id := csr.Subject.CommonName
	if stored.DeviceID != "" {
		if id != "" && id != stored.DeviceID {
			// Only the token's holder reads this, and the token enrolls
			// that id anyway; the CSR's id is not echoed, as it is
			// whatever the client wrote.
			return nil, Errorf(CodeIDMismatch, "token is bound to another device id: %s", stored.DeviceID)
		}
		id = stored.DeviceID
	}
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	cert, err := h.cfg.CA.IssueDevice(csr.PublicKey, id, h.cfg.CertLifetime)
	if err != nil {
		return nil, err
	}
	err = h.st.Enroll(ctx, store.Enrollment{
		TokenHash: stored.Hash,
		Device:    store.Device{ID: id, Role: store.RoleDevice, Labels: stored.Labels},
		Cert:      certRecord(cert, id, now),
		Remote:    remote,
		Now:       now,
	})
	if live := (*store.LiveTokensError)(nil); errors.As(err, &live) {
		// Told to the person installing the device, who can pick another
		// id, or pass the token's public id on to the operator.
		return nil, &Error{Code: CodeIDHasToken, Err: err, Message: fmt.Sprintf(
			"device id %s is reserved: bootstrap token %s is bound to it and has not enrolled it yet; "+
				"enroll under another id, or have the operator revoke that token (fleetmq token revoke %s)",
			id, live.Tokens[0].ID, live.Tokens[0].ID)}
	}
	if err != nil {
		return nil, err
	}
	if stored.Reprovision {
		h.superseded(ctx, id)
	}
	return cert, nil
}

// superseded makes the revocation of a re-provisioned device's earlier
// certificates effective: on the CRL, and their sessions closed. The
// enrollment is committed; neither failing makes it fail, nor does the
// client hanging up.
func (h *Handler) superseded(ctx context.Context, id string) {
	ctx = context.WithoutCancel(ctx)
	if err := h.RefreshCRL(ctx); err != nil {
		h.log.Error().Err(err).Str("id", id).Msg("refresh CRL after re-provisioning")
	}
	if h.cfg.OnReprovision != nil {
		h.cfg.OnReprovision(ctx, id)
	}
}

func (h *Handler) serveRenew(w http.ResponseWriter, r *http.Request) {
	h.attempt(w, r, OpRenew, "v1", func(remote string) (*x509.Certificate, store.AuditEvent, error) {
		cert, id, err := h.renew(r, remote)
		return cert, store.AuditEvent{DeviceID: id}, err
	}, func(cert *x509.Certificate, _ bool) { h.writeCert(w, r, http.StatusOK, cert) })
}

// RenewProof is the body of a renewal after expiry, when the client cannot
// (or does not) present its expired certificate in the TLS handshake.
type RenewProof struct {
	CSR         string `json:"csr"`         // PEM CSR for the new key
	Certificate string `json:"certificate"` // PEM of the expired certificate
	// Signature by the expired certificate's key over SHA-256 of the CSR's
	// DER (ECDSA: ASN.1; RSA: PKCS #1 v1.5), or over the DER itself for
	// Ed25519; standard base64.
	Signature string `json:"signature"`
}

// maxProofSize bounds the parts of a RenewProof after decoding.
const maxProofSize = 16 << 10

func (h *Handler) renew(r *http.Request, remote string) (*x509.Certificate, string, error) {
	mt, err := mediaType(r)
	if err != nil {
		return nil, "", err
	}
	body, err := readBody(r)
	if err != nil {
		return nil, "", err
	}
	var leaf *x509.Certificate
	var csr *x509.CertificateRequest
	switch mt {
	case "application/json":
		leaf, csr, err = parseProof(body)
		if err != nil {
			return nil, "", err
		}
	case "application/pkcs10", "application/x-pem-file", "application/octet-stream":
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			return nil, "", Errorf(CodeCertRequired, "renewal needs the current client certificate (or a JSON proof after expiry)")
		}
		// The TLS handshake proved possession of the key.
		leaf = r.TLS.PeerCertificates[0]
		if csr, err = ParseCSR(body); err != nil {
			return nil, "", err
		}
	default:
		return nil, "", Errorf(CodeUnsupportedMedia, "content type %q is not a CSR or a JSON renewal proof", mt)
	}
	return h.renewCert(r.Context(), leaf, csr, remote, sameCN)
}

// sameCN is /v1/renew's subject rule: a CSR may leave the CN out, but must
// not name another device.
func sameCN(leaf *x509.Certificate, csr *x509.CertificateRequest) error {
	if cn := csr.Subject.CommonName; cn != "" && cn != leaf.Subject.CommonName {
		return Errorf(CodeIDMismatch, "the CSR names another device than the certificate")
	}
	return nil
}

// renewCert issues a new certificate for the device of leaf, a certificate
// whose key the client has proven to hold: the flow shared by /v1/renew and
// EST simplereenroll. checkCSR is the endpoint's rule for the CSR's subject;
// it runs only once leaf is known to be ours.
//
// The device id is returned for the audit record of a failure, but only
// once leaf verifies as issued by the CA: until then its CN is whatever the
// client wrote (a real device's id, terminal escapes, 30,000 characters),
// and a self-signed certificate could file failures under any device.
func (h *Handler) renewCert(ctx context.Context, leaf *x509.Certificate, csr *x509.CertificateRequest, remote string,
	checkCSR func(leaf *x509.Certificate, csr *x509.CertificateRequest) error) (*x509.Certificate, string, error) {
	now := h.cfg.Now()
	beyondGrace, err := h.verifyClientCert(leaf, now)
	if err != nil {
		return nil, "", err
	}
	id := leaf.Subject.CommonName
	// The CA issues devices valid ids only, but an operator's CA may have
	// issued other client certificates too: a CN that is no device id
	// names no device in the audit record either.
	who := id
	if ValidateID(id) != nil {
		who = ""
	}
	if beyondGrace {
		return nil, who, h.refuseExpired(ctx, leaf, id)
	}
	if err := checkCSR(leaf, csr); err != nil {
		return nil, who, err
	}
	old := SerialHex(leaf.SerialNumber)
	rec, err := h.st.Cert(ctx, old)
	var adopt *store.Cert
	if errors.Is(err, store.ErrCertUnknown) && h.issuedWhileLost(leaf) {
		// Only for a device the store knows (checked below like any
		// other); one enrolled after the snapshot stays unknown.
		if _, derr := h.st.Device(ctx, id); derr == nil {
			// Exact unless NotBefore was held at the CA's start;
			// then at most backdate early.
			issued, _ := h.cfg.CA.issuedBetween(leaf)
			rec = certRecord(leaf, id, issued)
			adopt, err = &rec, nil
		}
	}
	if err != nil {
		return nil, who, err
	}
	if rec.DeviceID != id {
		return nil, who, Errorf(CodeIDMismatch, "certificate record belongs to another device")
	}
	// The device first: revoking it revokes its certificates too, and
	// cert_revoked alone says the id lives on with another key.
	dev, err := h.st.Device(ctx, id)
	if err != nil {
		return nil, who, err
	}
	if dev.Revoked() {
		return nil, who, Errorf(CodeDeviceRevoked, "device is revoked")
	}
	if rec.Revoked() {
		return nil, who, errSuperseded
	}
	if dev.Role != store.RoleDevice {
		// Services and operators are issued by an operator, never renewed
		// by themselves through the device endpoint.
		return nil, who, Errorf(CodeIDMismatch, "only devices renew here")
	}
	cert, err := h.cfg.CA.IssueDevice(csr.PublicKey, id, h.cfg.CertLifetime)
	if err != nil {
		return nil, who, err
	}
	err = h.st.Renew(ctx, store.Renewal{
		DeviceID: id, OldSerial: old, Cert: certRecord(cert, id, now), Remote: remote, Now: now, Adopt: adopt,
	})
	if err != nil {
		return nil, who, err
	}
	return cert, who, nil
}

// issuedWhileLost reports whether the CA may have issued leaf in the span a
// restored store has no records of: after its snapshot (a minute of slack
// for the clock), before it was first served. leaf is known to be the CA's.
func (h *Handler) issuedWhileLost(leaf *x509.Certificate) bool {
	if h.cfg.RestoredAt.IsZero() {
		return false
	}
	earliest, latest := h.cfg.CA.issuedBetween(leaf)
	return !latest.Before(h.cfg.RestoredFrom.Add(-time.Minute)) && !earliest.After(h.cfg.RestoredAt)
}

// verifyClientCert checks that leaf was issued by the fleet CA for client
// authentication, an *Error with CodeCertInvalid if not, and reports
// whether it expired more than RenewGrace ago. The chain is checked first,
// also for a certificate long expired, so that the answer to one of ours
// can say whether it is revoked (refuseExpired) and the answer to any other
// never depends on what it claims.
func (h *Handler) verifyClientCert(leaf *x509.Certificate, now time.Time) (beyondGrace bool, err error) {
	at := now
	if now.After(leaf.NotAfter) {
		// Check the chain as it stood just before expiry.
		at = leaf.NotAfter
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:       h.cfg.CA.Pool(),
		CurrentTime: at,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return false, &Error{Code: CodeCertInvalid, Message: "certificate was not issued by this CA for a client", Err: err}
	}
	return now.Sub(leaf.NotAfter) > h.cfg.RenewGrace, nil
}

// unavailableRetry is the Retry-After of a 503: a server that cannot store
// (its disk full, say) needs a person, and a fleet retrying every few
// seconds only adds load meanwhile.
const unavailableRetry = 60

// setRetryAfter says when to try again after e, if e says.
func setRetryAfter(h http.Header, e *Error) {
	switch ra, ok := e.Err.(retryAfter); {
	case e.Code == CodeRateLimited && ok:
		h.Set("Retry-After", strconv.Itoa(int(ra)))
	case e.Code == CodeUnavailable:
		h.Set("Retry-After", strconv.Itoa(unavailableRetry))
	}
}

// errSuperseded refuses a revoked certificate of a device that is not
// revoked: only re-provisioning revokes one alone.
var errSuperseded = Errorf(CodeCertRevoked, "certificate is revoked: the device was re-provisioned with a new key")

// refuseExpired answers leaf, a certificate of the CA for device id that
// expired more than RenewGrace ago. A revoked certificate or device is told
// so, as within the grace: the advice for an expired one, re-provisioning,
// would only end in another refusal, since a revoked id is never used
// again. The message is the advice device-agent gives for cert_expired.
func (h *Handler) refuseExpired(ctx context.Context, leaf *x509.Certificate, id string) error {
	dev, err := h.st.Device(ctx, id)
	switch {
	case err == nil && dev.Revoked():
		return Errorf(CodeDeviceRevoked, "device is revoked")
	case err != nil && !errors.Is(err, store.ErrNotFound):
		return err
	}
	rec, err := h.st.Cert(ctx, SerialHex(leaf.SerialNumber))
	switch {
	case err == nil && rec.Revoked():
		return errSuperseded
	case err != nil && !errors.Is(err, store.ErrCertUnknown):
		return err
	}
	if ValidateID(id) != nil {
		id = "ID"
	}
	expired := "certificate expired"
	if h.cfg.RenewGrace > 0 {
		expired = fmt.Sprintf("certificate expired more than %s ago", h.cfg.RenewGrace)
	}
	return Errorf(CodeCertExpired, "%s; enroll again with a token that re-provisions this device "+
		"(fleetmq token create --device %s --reprovision)", expired, id)
}

func parseProof(body []byte) (*x509.Certificate, *x509.CertificateRequest, error) {
	var p RenewProof
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return nil, nil, proofJSONError(body, err)
	}
	// More() misses a stray '}' or ']'; only the end of input will do.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, nil, Errorf(CodeBadRequest, "renewal proof has trailing data")
	}
	csr, err := ParseCSR([]byte(p.CSR))
	if err != nil {
		return nil, nil, err
	}
	block, rest := pem.Decode([]byte(p.Certificate))
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, Errorf(CodeCertInvalid, "certificate must be PEM CERTIFICATE blocks, the device's first")
	}
	// Its chain may follow, as in the PEM answer of /v1/enroll: the
	// server checks the leaf against its own CA and ignores the rest.
	for next := rest; len(bytes.TrimSpace(next)) != 0; {
		var b *pem.Block
		if b, next = pem.Decode(next); b == nil || b.Type != "CERTIFICATE" {
			return nil, nil, Errorf(CodeCertInvalid, "certificate must be PEM CERTIFICATE blocks, the device's first")
		}
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, &Error{Code: CodeCertInvalid, Message: "certificate does not parse", Err: err}
	}
	sig, err := base64.StdEncoding.DecodeString(p.Signature)
	if err != nil || len(sig) == 0 || len(sig) > maxProofSize {
		return nil, nil, Errorf(CodeProofInvalid, "signature must be non-empty standard base64")
	}
	if !verifyProof(leaf.PublicKey, csr.Raw, sig) {
		return nil, nil, Errorf(CodeProofInvalid, "signature does not verify with the certificate's key")
	}
	return leaf, csr, nil
}

// proofFields are the JSON names of RenewProof's fields.
var proofFields = []string{"csr", "certificate", "signature"}

// proofJSONError says what is wrong with a renewal proof that encoding/json
// refused: a syntax error, a value that is not a string, or a field that
// RenewProof does not have. Client text in the message is cut short.
func proofJSONError(body []byte, err error) *Error {
	e := &Error{Code: CodeBadRequest, Err: err}
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntax):
		e.Message = fmt.Sprintf("renewal proof is not valid JSON (at byte %d)", syntax.Offset)
	case errors.Is(err, io.ErrUnexpectedEOF):
		e.Message = "renewal proof is not valid JSON (it ends too early)"
	case errors.As(err, &typ) && typ.Field != "":
		e.Message = fmt.Sprintf("renewal proof field %q must be a string", clientText(typ.Field, 32))
	case errors.As(err, &typ):
		e.Message = "renewal proof must be a JSON object with the fields " + strings.Join(proofFields, ", ")
	default:
		// encoding/json reports an unknown field in an untyped error;
		// finding the field again beats parsing the error's text.
		if name, ok := unknownProofField(body); ok {
			e.Message = fmt.Sprintf("renewal proof has an unknown field %q; its fields are %s",
				clientText(name, 64), strings.Join(proofFields, ", "))
		} else {
			e.Message = "renewal proof must be a JSON object with the fields " + strings.Join(proofFields, ", ")
		}
	}
	return e
}

// unknownProofField returns the first key of the JSON object body that is
// none of proofFields, matched without regard to case as encoding/json
// matches them.
func unknownProofField(body []byte) (string, bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return "", false
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return "", false
		}
		key, _ := tok.(string)
		if !slices.ContainsFunc(proofFields, func(f string) bool { return strings.EqualFold(f, key) }) {
			return key, true
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return "", false
		}
	}
	return "", false
}

// verifyProof checks a signature over msg (the CSR DER) by pub. Replaying a
// captured proof gains nothing: it only yields a certificate for the CSR's
// key, which the attacker does not hold.
func verifyProof(pub any, msg, sig []byte) bool {
	digest := sha256.Sum256(msg)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(k, digest[:], sig)
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], sig) == nil
	case ed25519.PublicKey:
		return ed25519.Verify(k, msg, sig)
	}
	return false
}

func certRecord(c *x509.Certificate, id string, now time.Time) store.Cert {
	return store.Cert{
		Serial: SerialHex(c.SerialNumber), DeviceID: id,
		NotBefore: c.NotBefore, NotAfter: c.NotAfter, IssuedAt: now, DER: c.Raw,
	}
}

func (h *Handler) writeCert(w http.ResponseWriter, r *http.Request, status int, cert *x509.Certificate) {
	leaf := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	if wantsPEM(r) {
		w.Header().Set("Content-Type", "application/x-pem-file")
		w.WriteHeader(status)
		w.Write(leaf)
		w.Write(h.cfg.CA.ChainPEM())
		return
	}
	writeJSON(w, status, Response{
		DeviceID:    cert.Subject.CommonName,
		Certificate: string(leaf),
		CA:          string(h.cfg.CA.ChainPEM()),
		NotAfter:    cert.NotAfter.UTC(),
		BrokerURL:   h.brokerURL(r),
	})
}

func (h *Handler) brokerURL(r *http.Request) string {
	if h.cfg.BrokerURL != "" {
		return h.cfg.BrokerURL
	}
	return "mqtts://" + net.JoinHostPort(requestHost(r), strconv.FormatInt(h.mqttPort.Load(), 10))
}

// requestHost is the host the client reached the server by, without port
// or brackets (JoinHostPort adds those back): the Host header, which lacks
// the port when the client used its scheme's default, so that an IPv6
// literal comes as "[2001:db8::1]". An HTTP/1.0 client may send no Host:
// then the TLS server name, and for a client that dialed an IP address
// (no server name) the local address it reached.
func requestHost(r *http.Request) string {
	host := r.Host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		host = hh
	} else if len(host) > 2 && host[0] == '[' && host[len(host)-1] == ']' {
		host = host[1 : len(host)-1]
	}
	if host == "" && r.TLS != nil {
		host = r.TLS.ServerName
	}
	if host == "" {
		if addr, ok := r.Context().Value(http.LocalAddrContextKey).(*net.TCPAddr); ok {
			host = addr.IP.String()
		}
	}
	if host == "" {
		host = "localhost"
	}
	return host
}

// errRateLimited stands for a refusal by the failure limiter in observe.
var errRateLimited = &Error{Code: CodeRateLimited}

// observe reports the outcome of an enrollment or renewal to Config.Observe.
func (h *Handler) observe(op string, err error) {
	if h.cfg.Observe == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = string(AsError(err).Code)
	}
	h.cfg.Observe(op, result)
}

// fail answers a failed enrollment or renewal, already charged to the
// remote address: it is recorded in the audit log and answered with its
// code.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, e *Error, ev store.AuditEvent) {
	ev.Time = h.cfg.Now()
	ev.Detail = string(e.Code)
	// The audit record must not depend on the client's connection staying up.
	if aerr := h.st.AppendAudit(context.WithoutCancel(r.Context()), ev); aerr != nil {
		h.log.Error().Err(aerr).Msg("append audit event")
	}
	h.writeError(w, r, e)
}

func (h *Handler) writeError(w http.ResponseWriter, r *http.Request, err error) {
	e := AsError(err)
	status := e.Status()
	if status >= 500 {
		h.log.Error().Err(e.Err).Str("code", string(e.Code)).Str("path", r.URL.Path).Msg("request failed")
	} else {
		h.log.Debug().Str("code", string(e.Code)).Str("path", r.URL.Path).Str("remote", remoteHost(r)).Msg("request refused")
	}
	if isESTPath(r.URL.Path) {
		writeESTError(w, e)
		return
	}
	WriteError(w, e)
}

// WriteError writes e as the JSON error body {code, message} with its status.
func WriteError(w http.ResponseWriter, e *Error) {
	setRetryAfter(w.Header(), e)
	writeJSON(w, e.Status(), struct {
		Code    Code   `json:"code"`
		Message string `json:"message"`
	}{e.Code, e.Message})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	// Messages quote syntax such as 'Bearer <token>'. The answer is JSON
	// with nosniff, never HTML, so escaping <, > and & as \u003c, \u003e
	// and \u0026 would only garble it for people and shell scripts.
	enc.SetEscapeHTML(false)
	enc.Encode(v)
}

func wantsPEM(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept"), ",") {
		mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err == nil && (mt == "application/x-pem-file" || mt == "application/pem-certificate-chain") {
			return true
		}
	}
	return false
}

func bearerToken(r *http.Request) (string, error) {
	auth := r.Header.Get("Authorization")
	if auth == "" {
		return "", Errorf(CodeTokenMissing, "send the bootstrap token as 'Authorization: Bearer <token>'")
	}
	scheme, tok, ok := strings.Cut(auth, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", Errorf(CodeTokenMissing, "send the bootstrap token as 'Authorization: Bearer <token>'")
	}
	return tok, nil
}

func mediaType(r *http.Request) (string, error) {
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return "", Errorf(CodeUnsupportedMedia, "set Content-Type: application/pkcs10")
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return "", Errorf(CodeUnsupportedMedia, "malformed Content-Type")
	}
	return mt, nil
}

func csrContentType(r *http.Request) error {
	mt, err := mediaType(r)
	if err != nil {
		return err
	}
	switch mt {
	case "application/pkcs10", "application/x-pem-file", "application/octet-stream":
		return nil
	}
	return Errorf(CodeUnsupportedMedia, "content type %q is not a CSR; use application/pkcs10", mt)
}

func readBody(r *http.Request) ([]byte, error) {
	if r.ContentLength > MaxBodySize {
		return nil, Errorf(CodeBodyTooLarge, "body larger than %d bytes", MaxBodySize)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, MaxBodySize+1))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The server's read timeout ran out before the body did: a client
		// sending slowly or stalled. The write timeout is longer, so it
		// still gets this answer.
		return nil, &Error{Code: CodeBadRequest, Message: "the request body did not arrive within the server's read timeout", Err: err}
	}
	if err != nil {
		return nil, &Error{Code: CodeBadRequest, Message: "could not read the request body", Err: err}
	}
	if len(body) > MaxBodySize {
		return nil, Errorf(CodeBodyTooLarge, "body larger than %d bytes", MaxBodySize)
	}
	if len(body) == 0 {
		return nil, Errorf(CodeCSRInvalid, "empty body; send a PKCS#10 CSR")
	}
	return body, nil
}

// maxRemoteLen bounds the remote address kept for the failure limiter, log
// lines and audit records; an IP address takes at most 45 characters, with
// room left for a zone.
const maxRemoteLen = 64

// remoteHost is the client's address without the port. net/http takes
// RemoteAddr from the connection, but a handler wrapping this one (a
// proxy's middleware, say) may set it from a header to anything: so it is
// cut short and cleaned like any text from a client.
func remoteHost(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	return clientText(host, maxRemoteLen)
}

// clientText makes text a client controls safe for a log line, an audit
// record or a message: at most n bytes, every byte outside printable ASCII
// replaced by '?'. So it can neither break a record or a terminal with
// newlines and escape sequences nor bloat what it goes into.
func clientText(s string, n int) string {
	if len(s) > n {
		s = s[:n]
	}
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '?'
		}
	}
	return string(b)
}
