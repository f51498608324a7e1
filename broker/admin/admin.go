// Package admin is the operator API of a running fleetmq server: JSON over
// HTTP on a unix socket in the data folder, guarded by the socket's file
// mode (0600) and the folder's (0700). The fleetmq CLI is its client.
package admin

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// Store is the fleet state the admin API reads and changes.
type Store interface {
	CreateTokens(ctx context.Context, toks []store.Token, remote string, now time.Time) error
	ReplaceTokens(ctx context.Context, toks []store.Token, remote string, now time.Time) error
	Tokens(ctx context.Context) ([]store.Token, error)
	RevokeToken(ctx context.Context, id, remote string, now time.Time) (store.Token, error)
	Device(ctx context.Context, id string) (store.Device, error)
	DeviceCerts(ctx context.Context, id string) ([]store.Cert, error)
	Devices(ctx context.Context) ([]store.Device, error)
	RevokeDevice(ctx context.Context, id, remote string, now time.Time) ([]store.Cert, error)
	RevokeDevices(ctx context.Context, ids []string, remote string, now time.Time) ([]store.DeviceRevocation, error)
	CreateIdentity(ctx context.Context, d store.Device, c store.Cert, remote string, now time.Time) error
	Renew(ctx context.Context, r store.Renewal) error
	Audit(ctx context.Context, f store.AuditFilter) ([]store.AuditEvent, error)
	Telemetry(ctx context.Context, deviceID string, since time.Time, limit int) ([]store.Message, error)
	Presences(ctx context.Context) (map[string]store.Presence, error)
	Backup(ctx context.Context, w io.Writer, size func(int64)) (int64, error)
	AppendAudit(ctx context.Context, evs ...store.AuditEvent) error
}

// Config configures the admin API. Zero values mean the defaults named.
type Config struct {
	CA *enroll.CA // required
	// OnRevoke runs after a revocation of identities ids was committed:
	// it closes their live sessions and refreshes the CRL, once for all
	// of them. Optional.
	OnRevoke func(ctx context.Context, ids ...string)
	// Online lists the identities connected to this node. Optional.
	Online func() []string
	// Unwritten returns this node's presence changes not yet in the
	// store, which are newer than the store's: without them a device
	// that just went offline showed its connect time as last seen.
	// Optional.
	Unwritten func() map[string]store.Presence
	// Command publishes a command to a device and, with wait > 0, waits
	// for its reply (see Handler.Command). Optional: without it the
	// server sends no commands.
	Command func(ctx context.Context, id, name string, payload []byte, wait time.Duration) (Sent, error)
	// CommandMany is Command to several devices in one wait: all are
	// sent first, then their replies collected in one window of wait
	// (see Handler.CommandMany). sent[i] is ids[i]'s, its Err set when
	// nothing went to it; err refuses the whole request, nothing sent.
	// Optional: without it the server sends no command to many devices.
	CommandMany func(ctx context.Context, ids []string, name string, payload []byte, wait time.Duration) (sent []Sent, err error)
	// Follow streams telemetry as it is stored, for `fleetmq telemetry --follow`. Optional.
	Follow func(id string) (<-chan store.Message, func())
	// DashboardLogin returns the loopback dashboard's login page and a
	// one-time code for it, or an error saying why there is none.
	// Optional: without it the dashboard is off.
	DashboardLogin func() (url, code string, err error)
	// ServiceLifetime is the lifetime of service and operator certificates; default 365 days.
	ServiceLifetime time.Duration
	// MaxTokensPerRequest bounds bulk token creation; default 100,000.
	MaxTokensPerRequest int
	// Observe, when set, is called once per revocation with op
	// OpRevokeDevice or OpRevokeToken and the outcome: "ok" or the public
	// error code; for a list, once per id, or once for a list refused
	// whole. It feeds metrics and must not block. Default none.
	Observe func(op, result string)
	Logger  zerolog.Logger   // default zerolog.Nop()
	Now     func() time.Time // default time.Now
}

// Operations reported to Config.Observe.
const (
	OpRevokeDevice = "revoke_device"
	OpRevokeToken  = "revoke_token"
)

// Handler serves the admin API. Its exported methods are the operations
// behind the endpoints, for other operator front ends (the dashboard) in the
// same process; remote names the caller in the audit log.
type Handler struct {
	cfg Config
	st  Store
	mux *http.ServeMux
}

// New returns the admin API handler.
func New(cfg Config, st Store) (*Handler, error) {
	if cfg.CA == nil || st == nil {
		return nil, errors.New("admin: config needs a CA and a store")
	}
	if cfg.ServiceLifetime == 0 {
		cfg.ServiceLifetime = 365 * 24 * time.Hour
	}
	if cfg.MaxTokensPerRequest == 0 {
		cfg.MaxTokensPerRequest = 100_000
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	h := &Handler{cfg: cfg, st: st, mux: http.NewServeMux()}
	h.mux.HandleFunc("GET /v1/ca", h.getCA)
	h.mux.HandleFunc("POST /v1/tokens", h.createTokens)
	h.mux.HandleFunc("GET /v1/tokens", h.listTokens)
	h.mux.HandleFunc("POST /v1/tokens/{id}/revoke", h.revokeToken)
	h.mux.HandleFunc("GET /v1/devices", h.listDevices)
	h.mux.HandleFunc("GET /v1/devices/{id}", h.getDevice)
	h.mux.HandleFunc("POST /v1/devices/{id}/revoke", h.revokeDevice)
	h.mux.HandleFunc("POST /v1/devices/revoke", h.revokeDevices)
	h.mux.HandleFunc("POST /v1/devices/{id}/commands", h.command)
	h.mux.HandleFunc("POST /v1/commands", h.commandMany)
	h.mux.HandleFunc("POST /v1/identities", h.issueIdentity)
	h.mux.HandleFunc("GET /v1/audit", h.audit)
	h.mux.HandleFunc("GET /v1/telemetry/{id}", h.telemetry)
	h.mux.HandleFunc("GET /v1/backup", h.backup)
	h.mux.HandleFunc("POST /v1/dashboard/login", h.dashboardLogin)
	return h, nil
}

// DashboardLink is the loopback dashboard's login page and a one-time
// code to enter there.
type DashboardLink struct {
	URL  string `json:"url"`
	Code string `json:"code"`
}

// dashboardLogin hands out a dashboard login code: whoever may use this
// socket may use the dashboard, and no one else.
func (h *Handler) dashboardLogin(w http.ResponseWriter, r *http.Request) {
	if h.cfg.DashboardLogin == nil {
		writeErr(w, h.cfg.Logger, enroll.Errorf(enroll.CodeNotFound, "this server has no dashboard"))
		return
	}
	u, code, err := h.cfg.DashboardLogin()
	if err != nil {
		writeErr(w, h.cfg.Logger, &enroll.Error{Code: enroll.CodeNotFound, Err: err, Message: err.Error()})
		return
	}
	h.cfg.Logger.Info().Msg("dashboard login code issued")
	writeJSON(w, http.StatusOK, DashboardLink{URL: u, Code: code})
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if _, pattern := h.mux.Handler(r); pattern == "" {
		writeErr(w, h.cfg.Logger, enroll.Errorf(enroll.CodeNotFound, "no such admin endpoint: %s %s", r.Method, r.URL.Path))
		return
	}
	h.mux.ServeHTTP(w, r)
}

// remote names the admin caller in audit records.
const remote = "admin"

// CAInfo describes the fleet CA.
type CAInfo struct {
	Subject     string    `json:"subject"`
	Fingerprint string    `json:"fingerprint_sha256"`
	NotBefore   time.Time `json:"not_before"`
	NotAfter    time.Time `json:"not_after"`
	// ChainNotAfter is the earliest end in the CA's chain (an operator CA
	// under a root that ends first): no certificate verifies after it, so
	// it, not NotAfter, is when the fleet must have a renewed CA.
	ChainNotAfter time.Time `json:"chain_not_after"`
	Chain         string    `json:"chain_pem"`
}

func (h *Handler) getCA(w http.ResponseWriter, r *http.Request) {
	c := h.cfg.CA.Cert()
	fp := h.cfg.CA.Fingerprint()
	writeJSON(w, http.StatusOK, CAInfo{
		Subject: c.Subject.String(), Fingerprint: hex.EncodeToString(fp[:]),
		NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC(), ChainNotAfter: h.cfg.CA.ChainEnd().UTC(),
		Chain: string(h.cfg.CA.ChainPEM()),
	})
}

// TokenRequest asks for one or more bootstrap tokens.
type TokenRequest struct {
	DeviceID string `json:"device_id,omitempty"` // bind the token to this id
	// Reprovision, with DeviceID, lets the token enroll that existing
	// device again (see store.Token.Reprovision).
	Reprovision bool              `json:"reprovision,omitempty"`
	Uses        int               `json:"uses,omitempty"` // default 1
	TTL         string            `json:"ttl,omitempty"`  // Go duration; default 24h
	Labels      map[string]string `json:"labels,omitempty"`
	Count       int               `json:"count,omitempty"`  // mint this many tokens bound to BatchID(Prefix, Start)…; default 1
	Prefix      string            `json:"prefix,omitempty"` // with Count
	// Start is the number of the first id with Count, so that a large
	// batch can be minted in several requests, or a line go on where the
	// last batch ended; default 1.
	Start int `json:"start,omitempty"`
	// Replace revokes the usable tokens already bound to the ids, in the
	// transaction that mints the new ones; without it such an id is
	// refused (id_has_token).
	Replace bool `json:"replace,omitempty"`
}

// BatchID is the id of number n in a batch with prefix: at least four
// digits, zero-padded (pi-0001 … pi-9999, pi-10000 …). The width never
// depends on the batch, so a number has one id whichever batch mints it,
// and a later batch reaching it collides with it rather than minting a
// second device (pi-5001 beside pi-05001) for the same number.
func BatchID(prefix string, n int) string { return fmt.Sprintf("%s%04d", prefix, n) }

// NewToken is a minted token: the only time its secret is shown.
type NewToken struct {
	store.Token
	Secret string `json:"token"`
}

func (h *Handler) createTokens(w http.ResponseWriter, r *http.Request) {
	var req TokenRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	toks, err := h.MintTokens(r.Context(), req, remote)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusCreated, toks)
}

const (
	maxIDNumber = 999_999_999 // largest number of a bulk id
	maxTokenTTL = 365 * 24 * time.Hour
	maxLabels   = 32
	maxLabelLen = 256
)

// planTokens validates req.
func (h *Handler) planTokens(req TokenRequest) (tokenPlan, error) {
	uses := req.Uses
	if uses == 0 {
		uses = 1
	}
	if uses < 1 || uses > 1_000_000 {
		return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "uses must be between 1 and 1000000")
	}
	ttl := 24 * time.Hour
	if req.TTL != "" {
		d, err := ParseDuration(req.TTL)
		if err != nil || d <= 0 || d > maxTokenTTL {
			return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "ttl must be a positive duration up to %dd", maxTokenTTL/(24*time.Hour))
		}
		ttl = d
	}
	if err := checkLabels(req.Labels); err != nil {
		return tokenPlan{}, err
	}
	var ids []string
	switch {
	// Any count but zero asks for a batch, so a negative one is refused
	// below rather than read as "no count".
	case req.Count != 0 || req.Prefix != "":
		if req.DeviceID != "" || req.Reprovision {
			return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "count/prefix exclude device_id and reprovision")
		}
		if req.Count < 1 || req.Count > h.cfg.MaxTokensPerRequest {
			return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "count must be between 1 and %d", h.cfg.MaxTokensPerRequest)
		}
		if req.Prefix == "" {
			// Bare numbers are valid ids, but hardly what was meant.
			return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "count needs a prefix: the ids are PREFIX0001, PREFIX0002, …")
		}
		start := req.Start
		if start == 0 {
			start = 1
		}
		if start < 1 || start > maxIDNumber-req.Count+1 {
			return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "start must be between 1 and %d minus count", maxIDNumber)
		}
		for i := start; i < start+req.Count; i++ {
			ids = append(ids, BatchID(req.Prefix, i))
		}
	case req.Start != 0:
		return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "start goes with count")
	case req.DeviceID != "":
		ids = []string{req.DeviceID}
	case req.Reprovision:
		return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "reprovision needs the device_id to re-provision")
	case req.Replace:
		// Asked for, it would be taken to have revoked something.
		return tokenPlan{}, enroll.Errorf(enroll.CodeBadRequest, "replace needs device_id or count: a free token is bound to no id, so it replaces no token")
	default:
		ids = []string{""}
	}
	for _, id := range ids {
		if id == "" {
			continue
		}
		if err := enroll.ValidateID(id); err != nil {
			return tokenPlan{}, err
		}
	}
	return tokenPlan{ids: ids, uses: uses, ttl: ttl}, nil
}

// CheckTokens validates req as MintTokens does before it mints anything
// (only whether the ids are free is left to MintTokens): the dashboard
// says what is wrong on its confirmation page rather than after it.
func (h *Handler) CheckTokens(req TokenRequest) error {
	_, err := h.planTokens(req)
	return err
}

// tokenPlan is what a valid TokenRequest mints.
type tokenPlan struct {
	ids  []string // "" for a free token
	uses int
	ttl  time.Duration
}

// MintTokens validates req, mints its tokens and stores them in one
// transaction. The secrets are in the answer only.
func (h *Handler) MintTokens(ctx context.Context, req TokenRequest, remote string) ([]NewToken, error) {
	p, err := h.planTokens(req)
	if err != nil {
		return nil, err
	}
	ids, uses, ttl := p.ids, p.uses, p.ttl
	now := h.cfg.Now()
	out := make([]NewToken, 0, len(ids))
	recs := make([]store.Token, 0, len(ids))
	for _, id := range ids {
		secret, hash, err := enroll.NewToken(h.cfg.CA.Fingerprint())
		if err != nil {
			return nil, fmt.Errorf("admin: mint token: %w", err)
		}
		t := store.Token{
			ID: enroll.TokenID(hash), Hash: hash, DeviceID: id, Reprovision: req.Reprovision, MaxUses: uses,
			Labels: req.Labels, CreatedAt: now, ExpiresAt: now.Add(ttl),
		}
		recs = append(recs, t)
		out = append(out, NewToken{Token: t, Secret: secret})
	}
	create := h.st.CreateTokens
	if req.Replace {
		create = h.st.ReplaceTokens
	}
	if err := create(ctx, recs, remote, now); err != nil {
		if e := h.bindError(ctx, req, ids, err); e != nil {
			return nil, e
		}
		return nil, fmt.Errorf("admin: store tokens: %w", err)
	}
	return out, nil
}

// bindError tells the operator why tokens could not be bound to ids, or
// returns nil if err is not about that.
func (h *Handler) bindError(ctx context.Context, req TokenRequest, ids []string, err error) error {
	fail := func(code enroll.Code, format string, args ...any) error {
		return &enroll.Error{Code: code, Err: err, Message: fmt.Sprintf(format, args...)}
	}
	if live := (*store.LiveTokensError)(nil); errors.As(err, &live) {
		return h.liveTokensError(ctx, req, live)
	}
	switch {
	case req.Reprovision && errors.Is(err, store.ErrNotFound):
		return fail(enroll.CodeNotFound, "no device %s to re-provision", req.DeviceID)
	case req.Reprovision && errors.Is(err, store.ErrDeviceRevoked):
		return fail(enroll.CodeDeviceRevoked, "device %s was revoked; revoked ids are never used again: bind the token to a new id", req.DeviceID)
	case !errors.Is(err, store.ErrDeviceExists):
		return nil
	}
	for _, id := range ids {
		d, derr := h.st.Device(ctx, id)
		if derr != nil {
			continue
		}
		var why string
		switch {
		case d.Role != store.RoleDevice:
			why = fmt.Sprintf("%s is a %s identity; tokens only enroll devices", id, d.Role)
		case d.Revoked():
			why = fmt.Sprintf("device %s exists and was revoked; revoked ids are never used again", id)
		default:
			why = fmt.Sprintf("device %s already exists; ids are for life", id)
		}
		// Whatever took the id, a batch goes on after it: "bind the
		// token to a new id" is no advice for a prefix and a count.
		if req.Prefix != "" {
			return fail(enroll.CodeIDTaken, "%s, so a batch starts after the ids taken and those of tokens still usable: --start %d (nothing was minted)", why, h.nextFree(ctx, req.Prefix))
		}
		switch {
		case d.Role != store.RoleDevice:
			return fail(enroll.CodeIDTaken, "%s", why)
		case d.Revoked():
			return fail(enroll.CodeIDTaken, "%s: bind the token to a new id", why)
		}
		return fail(enroll.CodeIDTaken, "device %s already exists; to let this token enroll it again (a new key and certificate, e.g. after its certificate expired beyond the renewal grace), make it a re-provisioning token (token create --reprovision, or the dashboard's \"enroll it again\" box)", id)
	}
	return nil
}

// liveTokensError tells the operator which ids of req already have usable
// tokens, and the ways out.
func (h *Handler) liveTokensError(ctx context.Context, req TokenRequest, live *store.LiveTokensError) error {
	ids := map[string]bool{}
	for _, t := range live.Tokens {
		ids[t.DeviceID] = true
	}
	const why = "a second token for an id leaves whichever device enrolls second with an unusable token"
	if req.Prefix != "" {
		return &enroll.Error{Code: enroll.CodeIDHasToken, Err: live, Message: fmt.Sprintf(
			"%d id(s) of this batch already have usable tokens: %s; %s. Start the batch after them (--start %d), "+
				"revoke them (fleetmq token revoke ID), or mint with --replace to revoke them in the same step (nothing was minted)",
			len(ids), liveList(live.Tokens, 10), why, h.nextFree(ctx, req.Prefix))}
	}
	return &enroll.Error{Code: enroll.CodeIDHasToken, Err: live, Message: fmt.Sprintf(
		"%s already has a usable token: %s; %s. Revoke it first (fleetmq token revoke %s), "+
			"or mint with --replace to revoke it in the same step (nothing was minted)",
		req.DeviceID, liveList(live.Tokens, 10), why, live.Tokens[0].ID)}
}

// liveList names at most n tokens, each with its bound id, public id and
// expiry, and how many more there are.
func liveList(toks []store.Token, n int) string {
	parts := make([]string, 0, min(n, len(toks))+1)
	for i, t := range toks {
		if i == n {
			parts = append(parts, fmt.Sprintf("and %d more (fleetmq token list)", len(toks)-n))
			break
		}
		parts = append(parts, fmt.Sprintf("%s (token %s, expires %s)", t.DeviceID, t.ID, t.ExpiresAt.UTC().Format(TimeLayout)))
	}
	return strings.Join(parts, ", ")
}

// TimeLayout is how operators read times: in UTC, labelled, as the CLI's
// tables and the dashboard print them.
const TimeLayout = "2006-01-02 15:04:05 UTC"

// nextFree is one more than the largest number after prefix in an
// identity's id (revoked ones included) or in the id of a token that can
// still be used, or 1. The tokens count because a batch is mostly not
// enrolled yet when the next is minted: a --start after the enrolled ids
// only would mint a second token for ids whose first one is already on a
// device, and whichever enrolls second finds its token unusable.
func (h *Handler) nextFree(ctx context.Context, prefix string) int {
	n, err := h.NextFree(ctx, prefix)
	if err != nil {
		return 1 // advice in a refusal: the refusal itself stands
	}
	return n
}

// NextFree is the first number a batch of tokens with prefix can start
// at (see nextFree), for front ends that offer it.
func (h *Handler) NextFree(ctx context.Context, prefix string) (int, error) {
	devs, err := h.st.Devices(ctx)
	if err != nil {
		return 0, fmt.Errorf("identities: %w", err)
	}
	toks, err := h.st.Tokens(ctx)
	if err != nil {
		return 0, fmt.Errorf("tokens: %w", err)
	}
	ids := make([]string, 0, len(devs)+len(toks))
	for _, d := range devs {
		ids = append(ids, d.ID)
	}
	now := h.cfg.Now()
	for _, t := range toks {
		if t.Check(now) == nil {
			ids = append(ids, t.DeviceID)
		}
	}
	next := 1
	for _, id := range ids {
		num, ok := strings.CutPrefix(id, prefix)
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(num); err == nil && n >= next {
			next = n + 1
		}
	}
	return next, nil
}

func checkLabels(labels map[string]string) error {
	if len(labels) > maxLabels {
		return enroll.Errorf(enroll.CodeBadRequest, "at most %d labels", maxLabels)
	}
	for k, v := range labels {
		if k == "" || len(k) > maxLabelLen || len(v) > maxLabelLen || strings.Contains(k, "=") {
			return enroll.Errorf(enroll.CodeBadRequest, "labels need a non-empty key without '=' and values of at most %d bytes", maxLabelLen)
		}
		// Labels are printed in terminals and tables: an escape sequence
		// or a newline in one would rewrite what an operator sees.
		if !printable(k) || !printable(v) {
			return enroll.Errorf(enroll.CodeBadRequest, "label %q: keys and values must be UTF-8 text without control characters", k)
		}
	}
	return nil
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' || unicode.In(r, unicode.Bidi_Control) {
			return false
		}
	}
	return true
}

// Token states, as listed.
const (
	TokenActive   = "active"
	TokenUsed     = "used"
	TokenExpired  = "expired"
	TokenRevoked  = "revoked"
	TokenUnusable = "unusable" // active, but its bound id can no longer be enrolled with it
)

// TokenInfo is a token as listed: its record and whether it can still
// enroll anything.
type TokenInfo struct {
	store.Token
	State string `json:"state"`
	Why   string `json:"why,omitempty"` // for TokenUnusable
}

// TokenInfos lists toks newest first with their states at now. device
// returns the stored identity with an id, if any: a token bound to an id
// that was enrolled since (with another token, or over EST) stays valid
// but can never be used, and is listed as unusable, with why.
func TokenInfos(toks []store.Token, device func(id string) (store.Device, bool), now time.Time) []TokenInfo {
	out := make([]TokenInfo, len(toks))
	for i, t := range toks {
		out[i] = TokenInfo{Token: t, State: TokenActive}
		switch t.Check(now) {
		case nil:
		case store.ErrTokenRevoked:
			out[i].State = TokenRevoked
			continue
		case store.ErrTokenExpired:
			out[i].State = TokenExpired
			continue
		default:
			out[i].State = TokenUsed
			continue
		}
		var dp *store.Device
		if d, ok := device(t.DeviceID); ok && t.DeviceID != "" {
			dp = &d
		}
		switch err := t.BindingErr(dp); {
		case err == nil:
		case errors.Is(err, store.ErrDeviceRevoked):
			out[i].State, out[i].Why = TokenUnusable, fmt.Sprintf("%s was revoked; revoked ids are never used again", t.DeviceID)
		case errors.Is(err, store.ErrNotFound):
			out[i].State, out[i].Why = TokenUnusable, fmt.Sprintf("no device %s to re-provision", t.DeviceID)
		case dp.Role != store.RoleDevice:
			out[i].State, out[i].Why = TokenUnusable, fmt.Sprintf("%s is a %s identity; tokens only enroll devices", t.DeviceID, dp.Role)
		default:
			out[i].State, out[i].Why = TokenUnusable, fmt.Sprintf("%s exists; only a re-provisioning token (token create --reprovision) enrolls it again", t.DeviceID)
		}
	}
	slices.SortStableFunc(out, func(a, b TokenInfo) int {
		return cmp.Or(b.CreatedAt.Compare(a.CreatedAt), strings.Compare(a.ID, b.ID))
	})
	return out
}

// TokenInfos lists every token, newest first, with its state.
func (h *Handler) TokenInfos(ctx context.Context) ([]TokenInfo, error) {
	toks, err := h.st.Tokens(ctx)
	if err != nil {
		return nil, err
	}
	devs, err := h.st.Devices(ctx)
	if err != nil {
		return nil, err
	}
	byID := make(map[string]store.Device, len(devs))
	for _, d := range devs {
		byID[d.ID] = d
	}
	return TokenInfos(toks, func(id string) (store.Device, bool) { d, ok := byID[id]; return d, ok }, h.cfg.Now()), nil
}

func (h *Handler) listTokens(w http.ResponseWriter, r *http.Request) {
	infos, err := h.TokenInfos(r.Context())
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, infos)
}

func (h *Handler) revokeToken(w http.ResponseWriter, r *http.Request) {
	t, err := h.RevokeToken(r.Context(), r.PathValue("id"), remote)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

// RevokeToken revokes the token with public id.
func (h *Handler) RevokeToken(ctx context.Context, id, remote string) (store.Token, error) {
	t, err := h.st.RevokeToken(ctx, id, remote, h.cfg.Now())
	h.observe(OpRevokeToken, err)
	if errors.Is(err, store.ErrTokenRevoked) {
		return t, &enroll.Error{Code: enroll.CodeTokenRevoked, Err: err, Message: fmt.Sprintf("token %s was already revoked; nothing changed", id)}
	}
	return t, named(err, "token", id)
}

// named turns the store's bare "not found" into a message that says what
// was not found.
func named(err error, what, id string) error {
	if errors.Is(err, store.ErrNotFound) {
		return &enroll.Error{Code: enroll.CodeNotFound, Message: fmt.Sprintf("no %s %q", what, id), Err: err}
	}
	return err
}

func (h *Handler) observe(op string, err error) {
	if h.cfg.Observe == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = string(enroll.AsError(err).Code)
	}
	h.cfg.Observe(op, result)
}

// DeviceInfo is a device with its connection state.
type DeviceInfo struct {
	store.Device
	Online bool `json:"online"`
	// LastSeen is now for a connected identity, else when its last
	// connection ended (zero: never connected).
	LastSeen time.Time `json:"last_seen,omitzero"`
	// Certificates are the identity's certificate records, newest first;
	// set for one identity (DeviceInfo), not in lists.
	Certificates []store.Cert `json:"certificates,omitempty"`
}

// State is how operators see an identity: revoked, online or offline.
func (d DeviceInfo) State() string {
	switch {
	case d.Revoked():
		return "revoked"
	case d.Online:
		return "online"
	}
	return "offline"
}

// CertState is how operators see one of d's certificates at now:
// revoked, expired, current (the one d renews with) or valid (an earlier
// one a renewal left valid until it expires).
func (d DeviceInfo) CertState(c store.Cert, now time.Time) string {
	switch {
	case c.Revoked():
		return "revoked"
	case !c.NotAfter.After(now):
		return "expired"
	case c.Serial == d.Serial:
		return "current"
	}
	return "valid"
}

// DeviceInfos lists every identity with its connection state.
func (h *Handler) DeviceInfos(ctx context.Context) ([]DeviceInfo, error) {
	devs, err := h.st.Devices(ctx)
	if err != nil {
		return nil, err
	}
	return h.deviceInfos(ctx, devs)
}

// DeviceInfo returns identity id with its connection state.
func (h *Handler) DeviceInfo(ctx context.Context, id string) (DeviceInfo, error) {
	d, err := h.st.Device(ctx, id)
	if err != nil {
		return DeviceInfo{}, named(err, "identity", id)
	}
	infos, err := h.deviceInfos(ctx, []store.Device{d})
	if err != nil {
		return DeviceInfo{}, err
	}
	if infos[0].Certificates, err = h.st.DeviceCerts(ctx, id); err != nil {
		return DeviceInfo{}, named(err, "identity", id)
	}
	return infos[0], nil
}

func (h *Handler) deviceInfos(ctx context.Context, devs []store.Device) ([]DeviceInfo, error) {
	pres, err := h.st.Presences(ctx)
	if err != nil {
		return nil, err
	}
	online := map[string]bool{}
	if h.cfg.Online != nil {
		for _, id := range h.cfg.Online() {
			online[id] = true
		}
	}
	if h.cfg.Unwritten != nil {
		for id, p := range h.cfg.Unwritten() {
			pres[id] = p
		}
	}
	now := h.cfg.Now()
	out := make([]DeviceInfo, 0, len(devs))
	for _, d := range devs {
		seen := pres[d.ID].LastSeen
		if online[d.ID] {
			// The stored time is when it connected: shown as "last
			// seen", a device online for a week read as gone a week.
			seen = now
		}
		out = append(out, DeviceInfo{Device: d, Online: online[d.ID], LastSeen: seen})
	}
	return out, nil
}

func (h *Handler) listDevices(w http.ResponseWriter, r *http.Request) {
	infos, err := h.DeviceInfos(r.Context())
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(infos))
}

func (h *Handler) getDevice(w http.ResponseWriter, r *http.Request) {
	info, err := h.DeviceInfo(r.Context(), r.PathValue("id"))
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

// RevokeResult lists what a revocation revoked.
type RevokeResult struct {
	DeviceID string   `json:"device_id"`
	Serials  []string `json:"serials"`
}

func (h *Handler) revokeDevice(w http.ResponseWriter, r *http.Request) {
	res, err := h.RevokeDevice(r.Context(), r.PathValue("id"), remote)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// RevokeDevice revokes identity id and all its certificates, then runs
// Config.OnRevoke, which closes its sessions, even if ctx ends meanwhile.
func (h *Handler) RevokeDevice(ctx context.Context, id, remote string) (RevokeResult, error) {
	certs, err := h.st.RevokeDevice(ctx, id, remote, h.cfg.Now())
	h.observe(OpRevokeDevice, err)
	if errors.Is(err, store.ErrDeviceRevoked) {
		return RevokeResult{}, &enroll.Error{Code: enroll.CodeDeviceRevoked, Err: err, Message: fmt.Sprintf("%s was already revoked; nothing changed", id)}
	}
	if err != nil {
		return RevokeResult{}, named(err, "identity", id)
	}
	if h.cfg.OnRevoke != nil {
		h.cfg.OnRevoke(context.WithoutCancel(ctx), id)
	}
	h.cfg.Logger.Info().Str("device", id).Str("by", remote).Int("certificates", len(certs)).Msg("device revoked")
	return RevokeResult{DeviceID: id, Serials: serialsOf(certs)}, nil
}

func serialsOf(certs []store.Cert) []string {
	out := make([]string, len(certs))
	for i, c := range certs {
		out[i] = c.Serial
	}
	return out
}

// MaxRevokesPerRequest bounds the ids of one request to revoke several
// identities: they are revoked in one transaction, and every other write
// of the server (telemetry acknowledgements too) waits for it.
const MaxRevokesPerRequest = 10_000

// RevokeDevicesRequest asks to revoke several identities at once.
type RevokeDevicesRequest struct {
	IDs []string `json:"ids"`
}

// Results of RevokeOutcome.
const (
	ResultRevoked        = "revoked"
	ResultAlreadyRevoked = "already_revoked" // by an earlier request; nothing changed
)

// RevokeOutcome is what a request to revoke several identities did to one.
type RevokeOutcome struct {
	DeviceID string `json:"device_id"`
	Result   string `json:"result"` // ResultRevoked or ResultAlreadyRevoked
	// Serials are the certificates this request revoked.
	Serials   []string  `json:"serials"`
	RevokedAt time.Time `json:"revoked_at"`
}

func (h *Handler) revokeDevices(w http.ResponseWriter, r *http.Request) {
	var req RevokeDevicesRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	res, err := h.RevokeDevices(r.Context(), req.IDs, remote)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// RevokeDevices revokes the identities ids as RevokeDevice does each, in
// one transaction, then runs Config.OnRevoke once for all of them. An id
// that is malformed (id_invalid) or names no identity (not_found) refuses
// the whole request, and nothing is revoked. An identity already revoked
// is reported as such (ResultAlreadyRevoked) while the others are revoked.
// A repeated id counts once; the outcomes follow the order of ids.
func (h *Handler) RevokeDevices(ctx context.Context, ids []string, remote string) ([]RevokeOutcome, error) {
	switch {
	case len(ids) == 0:
		return nil, enroll.Errorf(enroll.CodeBadRequest, "no ids to revoke")
	case len(ids) > MaxRevokesPerRequest:
		return nil, enroll.Errorf(enroll.CodeBadRequest, "%d ids to revoke; at most %d per request: split the list (nothing was revoked)", len(ids), MaxRevokesPerRequest)
	}
	for i, id := range ids {
		if err := enroll.ValidateID(id); err != nil {
			e := enroll.AsError(err)
			return nil, &enroll.Error{Code: e.Code, Err: err, Message: fmt.Sprintf("id %d of %d: %s (nothing was revoked)", i+1, len(ids), e.Message)}
		}
	}
	now := h.cfg.Now()
	revs, err := h.st.RevokeDevices(ctx, ids, remote, now)
	if unknown := (*store.UnknownIDsError)(nil); errors.As(err, &unknown) {
		err = &enroll.Error{Code: enroll.CodeNotFound, Err: err, Message: fmt.Sprintf(
			"no identity %s (%d of the %d ids given): nothing was revoked; `fleetmq device list` shows the ids",
			quotedList(unknown.IDs, 10), len(unknown.IDs), len(ids))}
	}
	if err != nil {
		h.observe(OpRevokeDevice, err)
		return nil, err
	}
	out := make([]RevokeOutcome, len(revs))
	var revoked []string
	for i, r := range revs {
		out[i] = RevokeOutcome{DeviceID: r.ID, Result: ResultRevoked, Serials: serialsOf(r.Certs), RevokedAt: now.UTC()}
		if !r.Before.IsZero() {
			out[i].Result, out[i].RevokedAt = ResultAlreadyRevoked, r.Before.UTC()
			h.observe(OpRevokeDevice, store.ErrDeviceRevoked)
			continue
		}
		h.observe(OpRevokeDevice, nil)
		revoked = append(revoked, r.ID)
		h.cfg.Logger.Info().Str("device", r.ID).Str("by", remote).Int("certificates", len(r.Certs)).Msg("device revoked")
	}
	if len(revoked) > 0 && h.cfg.OnRevoke != nil {
		h.cfg.OnRevoke(context.WithoutCancel(ctx), revoked...)
	}
	return out, nil
}

// quotedList quotes the first most of ids and counts the rest.
func quotedList(ids []string, most int) string {
	shown := ids[:min(len(ids), most)]
	q := make([]string, len(shown))
	for i, id := range shown {
		q[i] = strconv.Quote(id)
	}
	s := strings.Join(q, ", ")
	if len(ids) > most {
		s += fmt.Sprintf(" and %d more", len(ids)-most)
	}
	return s
}

// IdentityRequest asks for a service or operator certificate. The caller
// keeps the private key; only the CSR travels.
type IdentityRequest struct {
	Name string     `json:"name"`
	Role store.Role `json:"role"` // service or operator
	CSR  string     `json:"csr"`  // PEM
	// Renew issues a new certificate to the existing, not revoked
	// identity Name of this role, instead of creating it: names are for
	// life, and a backend or an operator outlives a certificate. Earlier
	// certificates stay valid until they expire (or the identity is
	// revoked), so the new one can be deployed before the old one ends.
	Renew bool `json:"renew,omitempty"`
}

// IdentityResponse carries the issued certificate.
type IdentityResponse struct {
	Name        string    `json:"name"`
	Role        string    `json:"role"`
	Certificate string    `json:"certificate"`
	CA          string    `json:"ca"`
	NotAfter    time.Time `json:"not_after"`
}

func (h *Handler) issueIdentity(w http.ResponseWriter, r *http.Request) {
	var req IdentityRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	if req.Role != store.RoleService && req.Role != store.RoleOperator {
		writeErr(w, h.cfg.Logger, enroll.Errorf(enroll.CodeBadRequest, "role must be service or operator"))
		return
	}
	if err := enroll.ValidateID(req.Name); err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	csr, err := enroll.ParseCSR([]byte(req.CSR))
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	cert, err := h.cfg.CA.IssueDevice(csr.PublicKey, req.Name, h.cfg.ServiceLifetime)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	now := h.cfg.Now()
	d := store.Device{ID: req.Name, Role: req.Role}
	rec := store.Cert{Serial: enroll.SerialHex(cert.SerialNumber), DeviceID: req.Name,
		NotBefore: cert.NotBefore, NotAfter: cert.NotAfter, IssuedAt: now, DER: cert.Raw}
	if req.Renew {
		err = h.renewIdentity(r.Context(), req, rec, now)
	} else if err = h.st.CreateIdentity(r.Context(), d, rec, remote, now); errors.Is(err, store.ErrDeviceExists) {
		err = &enroll.Error{Code: enroll.CodeIDTaken, Err: err, Message: h.takenAdvice(r.Context(), req)}
	} else if live := (*store.LiveTokensError)(nil); errors.As(err, &live) {
		err = &enroll.Error{Code: enroll.CodeIDHasToken, Err: err, Message: fmt.Sprintf(
			"the name %s has a usable bootstrap token bound to it: %s; the device it was minted for would take the name. "+
				"Revoke the token first (fleetmq token revoke %s), or choose another name (nothing was issued)",
			req.Name, liveList(live.Tokens, 10), live.Tokens[0].ID)}
	}
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusCreated, IdentityResponse{
		Name: req.Name, Role: string(req.Role), Certificate: pemCert(cert),
		CA: string(h.cfg.CA.ChainPEM()), NotAfter: cert.NotAfter.UTC(),
	})
}

// takenAdvice says what to do about req.Name, which exists: renew it when
// it is an identity of req.Role that may renew, else choose another name.
// Advising --renew for a device's or a revoked name only led to a second
// refusal.
func (h *Handler) takenAdvice(ctx context.Context, req IdentityRequest) string {
	d, err := h.st.Device(ctx, req.Name)
	switch {
	case err != nil:
		return fmt.Sprintf("the name %s is taken (by a device, service or operator, revoked ones included): names are for life; choose another, or renew its certificate (%s issue %s --renew)", req.Name, req.Role, req.Name)
	case d.Revoked():
		return fmt.Sprintf("the name %s was revoked; revoked names are never used again: choose another", req.Name)
	case d.Role != req.Role:
		article := "a"
		if d.Role == store.RoleOperator {
			article = "an"
		}
		return fmt.Sprintf("the name %s is taken by %s %s; names are for life: choose another", req.Name, article, d.Role)
	}
	return fmt.Sprintf("the name %s is taken by this %s: to give it a new certificate, renew it (%s issue %s --renew)", req.Name, req.Role, req.Role, req.Name)
}

// renewIdentity records rec as the new certificate of the existing
// identity req.Name, which must have req.Role: a device renews itself, with
// its own key, through the enrollment endpoint.
func (h *Handler) renewIdentity(ctx context.Context, req IdentityRequest, rec store.Cert, now time.Time) error {
	d, err := h.st.Device(ctx, req.Name)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return &enroll.Error{Code: enroll.CodeNotFound, Err: err,
			Message: fmt.Sprintf("no %s %q to renew; without --renew the name is issued anew", req.Role, req.Name)}
	case err != nil:
		return err
	case d.Role == store.RoleDevice:
		return &enroll.Error{Code: enroll.CodeIDMismatch,
			Message: fmt.Sprintf("%s is a device: devices renew their own certificates (device-agent, or POST /v1/renew)", req.Name)}
	case d.Role != req.Role:
		return &enroll.Error{Code: enroll.CodeIDMismatch,
			Message: fmt.Sprintf("%s has the role %s, not %s", req.Name, d.Role, req.Role)}
	case d.Revoked():
		return &enroll.Error{Code: enroll.CodeDeviceRevoked, Err: store.ErrDeviceRevoked,
			Message: fmt.Sprintf("%s %s is revoked; revoked names are never used again: issue another name", req.Role, req.Name)}
	}
	err = h.st.Renew(ctx, store.Renewal{DeviceID: req.Name, OldSerial: d.Serial, Cert: rec, Remote: remote, Now: now})
	if errors.Is(err, store.ErrDeviceRevoked) || errors.Is(err, store.ErrCertRevoked) {
		// Revoked between the read and the commit.
		return &enroll.Error{Code: enroll.CodeDeviceRevoked, Err: err, Message: fmt.Sprintf("%s %s is revoked", req.Role, req.Name)}
	}
	return err
}

func (h *Handler) audit(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := store.AuditFilter{DeviceID: q.Get("device")}
	var err error
	if f.Since, err = parseSince(q.Get("since"), h.cfg.Now()); err == nil {
		f.Limit, err = parseLimit(q.Get("limit"))
	}
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	evs, err := h.st.Audit(r.Context(), f)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(evs))
}

// TelemetryRecord is one message as the admin API shows it.
type TelemetryRecord struct {
	DeviceID string    `json:"device_id"`
	Topic    string    `json:"topic"`
	Received time.Time `json:"received"`
	QoS      byte      `json:"qos"`
	// Payload is the message when it is JSON in UTF-8, a JSON string when
	// it is other UTF-8 text, and absent when it is binary (CBOR,
	// protobuf…) or not UTF-8, which PayloadBase64 then holds byte for
	// byte.
	Payload       json.RawMessage `json:"payload,omitempty"`
	PayloadBase64 []byte          `json:"payload_base64,omitempty"`
}

// Record converts a stored message.
func Record(m store.Message) TelemetryRecord {
	r := TelemetryRecord{DeviceID: m.DeviceID, Topic: m.Topic, Received: m.Received.UTC(), QoS: m.QoS}
	switch {
	case !utf8.Valid(m.Payload):
		// Not as JSON, even when json.Valid (it accepts invalid bytes
		// inside strings): the record would not be valid JSON, which
		// readers refuse or change to U+FFFD; nor as a JSON string,
		// which would replace every invalid byte with U+FFFD.
		r.PayloadBase64 = m.Payload
	case json.Valid(m.Payload):
		r.Payload = json.RawMessage(m.Payload)
	default:
		r.Payload, _ = json.Marshal(string(m.Payload))
	}
	return r
}

// telemetry streams NDJSON: one TelemetryRecord per line, oldest first; with
// follow=1 it then keeps the response open and streams new messages.
func (h *Handler) telemetry(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	q := r.URL.Query()
	since, err := parseSince(q.Get("since"), h.cfg.Now())
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	limit, err := parseLimit(q.Get("limit"))
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	if _, err := h.st.Device(r.Context(), id); err != nil {
		writeErr(w, h.cfg.Logger, named(err, "identity", id))
		return
	}
	follow := q.Get("follow") == "1" || q.Get("follow") == "true"
	// Subscribe before reading history so nothing falls between the two.
	var live <-chan store.Message
	if follow {
		if h.cfg.Follow == nil {
			writeErr(w, h.cfg.Logger, enroll.Errorf(enroll.CodeUnavailable, "this server cannot follow telemetry"))
			return
		}
		ch, cancel := h.cfg.Follow(id)
		defer cancel()
		live = ch
	}
	msgs, err := h.st.Telemetry(r.Context(), id, since, limit)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	for _, m := range msgs {
		if err := enc.Encode(Record(m)); err != nil {
			return
		}
	}
	if !follow {
		return
	}
	seen := newHistoryTail(msgs)
	flusher, _ := w.(http.Flusher)
	if flusher != nil {
		flusher.Flush()
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case m, ok := <-live:
			if !ok {
				return
			}
			if seen.sent(m) {
				continue
			}
			if err := enc.Encode(Record(m)); err != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}

// historyTail recognises live messages that the history already sent: the
// subscription starts before the history is read, so the two overlap. A
// live message is skipped only if it is one of the history's newest
// messages (time, topic and payload), each once; not because it was
// received before the history's newest message, which a new one also is
// when the server's clock has been set back.
type historyTail struct {
	tail []store.Message
	live int // live messages checked
}

// historyOverlap is how many of the newest history messages are kept to
// match: the overlap is what was committed between the subscription and
// the history read, the newest messages, and the broker buffers at most
// 256 of them for the follower (broker.followBuffer) before it drops.
const historyOverlap = 256

func newHistoryTail(msgs []store.Message) *historyTail {
	return &historyTail{tail: slices.Clone(msgs[max(0, len(msgs)-historyOverlap):])}
}

func (h *historyTail) sent(m store.Message) bool {
	// The overlap is among the first live messages, those the broker
	// buffered while the history was read: past them, nothing to match.
	if h.live++; h.live > historyOverlap {
		h.tail = nil
	}
	for i, t := range h.tail {
		if t.Received.Equal(m.Received) && t.Topic == m.Topic && string(t.Payload) == string(m.Payload) {
			h.tail = slices.Delete(h.tail, i, i+1)
			return true
		}
	}
	return false
}

func parseSince(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	// As the CLI's tables print times (telemetry adds milliseconds, which
	// Parse takes without a layout for them), so that a time can be
	// copied from one command into the next.
	if t, err := time.Parse(TimeLayout, s); err == nil {
		return t, nil
	}
	d, err := ParseDuration(s)
	switch {
	case err == nil && d < 0:
		return time.Time{}, enroll.Errorf(enroll.CodeBadRequest, "since must not be negative: %q", s)
	case err == nil && d > now.Sub(time.Time{}):
		return time.Time{}, nil // before anything was recorded
	case err == nil:
		return now.Add(-d), nil
	}
	return time.Time{}, enroll.Errorf(enroll.CodeBadRequest, "since must be a duration like 1h or 7d, a time in UTC as the tables print it (2026-12-07 20:26:32 UTC), or an RFC 3339 time (2026-12-07T20:26:32Z): %v", err)
}

func parseLimit(s string) (int, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 100_000 {
		return 0, enroll.Errorf(enroll.CodeBadRequest, "limit must be between 1 and 100000")
	}
	return n, nil
}

// maxRequest bounds admin request bodies; a bulk token request is small.
const maxRequest = 1 << 20

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &enroll.Error{Code: enroll.CodeBadRequest, Message: "request body is not the expected JSON", Err: err}
	}
	// More() misses a stray '}' or ']'; only the end of input will do.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return enroll.Errorf(enroll.CodeBadRequest, "request body has trailing data")
	}
	return nil
}

// SnapshotHeader carries the time of a backup's snapshot.
const SnapshotHeader = "Fleetmq-Snapshot-Time"

// backup streams a consistent copy of the database. The headers go out
// with the snapshot's size, so a failure after that can only cut the
// stream short, which the client sees against Content-Length.
func (h *Handler) backup(w http.ResponseWriter, r *http.Request) {
	started := false
	n, err := h.st.Backup(r.Context(), w, func(size int64) {
		started = true
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		// On the server's clock, which dates the certificates: the copy
		// is marked with it (store.MarkSnapshot).
		w.Header().Set(SnapshotHeader, h.cfg.Now().UTC().Format(time.RFC3339Nano))
		w.WriteHeader(http.StatusOK)
	})
	if err != nil {
		if !started {
			writeErr(w, h.cfg.Logger, err)
			return
		}
		h.cfg.Logger.Warn().Err(err).Int64("bytes", n).Msg("backup cut short")
		// Part of the database left the server all the same.
		h.auditBackup(r.Context(), fmt.Sprintf("cut short after %d bytes", n))
		panic(http.ErrAbortHandler) // close the connection, no more to say
	}
	h.cfg.Logger.Info().Int64("bytes", n).Msg("backup copy sent")
	// Recorded once the copy is complete, even if the caller hung up on
	// the last byte: the data left the server.
	h.auditBackup(r.Context(), fmt.Sprintf("%d bytes", n))
}

func (h *Handler) auditBackup(ctx context.Context, detail string) {
	ev := store.AuditEvent{Time: h.cfg.Now(), Action: store.ActBackup, Remote: remote, Detail: detail}
	if err := h.st.AppendAudit(context.WithoutCancel(ctx), ev); err != nil {
		h.cfg.Logger.Error().Err(err).Msg("audit the backup")
	}
}

func writeErr(w http.ResponseWriter, log zerolog.Logger, err error) {
	e := enroll.AsError(err)
	if enroll.DiskFull(err) {
		// The operator may know what a device may not.
		e = &enroll.Error{Code: enroll.CodeUnavailable, Message: "the server's disk is full (or its file size limit is reached): nothing can be stored until space is freed", Err: err}
	}
	if e.Status() >= 500 {
		log.Error().Err(err).Msg("admin request failed")
	}
	enroll.WriteError(w, e)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func pemCert(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}
