package ui

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.overview)
	mux.HandleFunc("GET /devices", s.devices)
	mux.HandleFunc("GET /devices/{id}", s.device)
	mux.HandleFunc("POST /devices/revoke", s.revokeDevices)
	mux.HandleFunc("GET /devices/{id}/revoke", s.confirmRevokeDevice)
	mux.HandleFunc("POST /devices/{id}/revoke", s.revokeDevice)
	mux.HandleFunc("POST /devices/{id}/command", s.commandDevice)
	mux.HandleFunc("GET /tokens", s.tokens)
	mux.HandleFunc("GET /tokens/new", s.confirmTokens)
	mux.HandleFunc("POST /tokens", s.createTokens)
	mux.HandleFunc("GET /tokens/{id}/revoke", s.confirmRevokeToken)
	mux.HandleFunc("POST /tokens/{id}/revoke", s.revokeToken)
	mux.HandleFunc("GET /audit", s.audit)
	mux.HandleFunc("GET /api/overview", s.apiOverview)
	mux.HandleFunc("GET /events", s.serveEvents)
	mux.Handle("GET /static/", staticHandler())
	mux.HandleFunc("/login", s.serveLogin)
	mux.HandleFunc("POST /logout", s.serveLogout)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.fail(w, r, http.StatusNotFound, "No such page.")
	})
	return s.guard(mux)
}

// page is what every template gets.
type page struct {
	Title  string
	Nav    string // active navigation entry
	Viewer viewer
	CSRF   string // form token of the session
	Flash  string
	Events string // URL of the event stream the page listens to
	Now    time.Time
	Window time.Duration // expiry window
	Data   any
}

// render writes template name with data; pages carry fleet state, so
// nothing is cached.
func (s *Server) render(w http.ResponseWriter, r *http.Request, status int, name string, p page) {
	tok, err := s.csrf.token(w, r)
	if err != nil {
		s.log.Error().Err(err).Msg("ui: session")
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	p.CSRF, p.Viewer, p.Now, p.Window = tok, viewerOf(r.Context()), s.cfg.Now(), s.cfg.ExpiryWindow
	if p.Flash == "" {
		p.Flash = flashes[r.URL.Query().Get("flash")]
	}
	var buf bytes.Buffer
	if err := s.pages.execute(&buf, name, p); err != nil {
		s.log.Error().Err(err).Str("page", name).Msg("ui: render")
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// flashes are the messages a redirect may ask for; never text from the URL.
var flashes = map[string]string{
	"revoked":       "Device revoked: its certificates are revoked, its sessions closed and the CRL updated.",
	"token-revoked": "Token revoked.",
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, status int, msg string) {
	if r.Header.Get("Accept") == "application/json" || strings.HasPrefix(r.URL.Path, "/api/") {
		writeJSON(w, status, map[string]string{"error": msg})
		return
	}
	if viewerOf(r.Context()) == (viewer{}) {
		// Refused before a viewer was known: no page chrome, no session.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(status)
		fmt.Fprintln(w, msg)
		return
	}
	s.render(w, r, status, "error", page{Title: http.StatusText(status), Data: msg})
}

func (s *Server) forbidden(w http.ResponseWriter, r *http.Request, msg string) {
	s.fail(w, r, http.StatusForbidden, msg)
}

// failErr answers err from the admin API or the store: public codes keep
// their status and message, anything else is a logged internal error.
func (s *Server) failErr(w http.ResponseWriter, r *http.Request, err error) {
	e := enroll.AsError(err)
	status := e.Status()
	switch e.Code {
	case enroll.CodeTokenRevoked, enroll.CodeDeviceRevoked, enroll.CodeCertRevoked:
		// The enrollment table answers a device presenting a revoked
		// credential (401/403); here an operator asks to change
		// something already in that state: a conflict, not a refusal
		// of the operator.
		status = http.StatusConflict
	}
	if status >= 500 {
		s.log.Error().Err(err).Str("path", r.URL.Path).Msg("ui: request failed")
	}
	s.fail(w, r, status, e.Message)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// summary is the fleet at a glance: devices (role device) by state.
type summary struct {
	Online    int `json:"online"`
	Offline   int `json:"offline"`
	Expiring  int `json:"expiring"`
	Revoked   int `json:"revoked"`
	Services  int `json:"services"`
	Operators int `json:"operators"`
}

func (s *Server) expiring(d admin.DeviceInfo) bool {
	return !d.Revoked() && d.NotAfter.Before(s.cfg.Now().Add(s.cfg.ExpiryWindow))
}

func (s *Server) summarize(infos []admin.DeviceInfo) summary {
	var sum summary
	for _, d := range infos {
		switch {
		case d.Role == store.RoleDevice:
		case d.Revoked():
			continue // a revoked service or operator no longer counts
		case d.Role == store.RoleService:
			sum.Services++
			continue
		case d.Role == store.RoleOperator:
			sum.Operators++
			continue
		}
		switch d.State() {
		case "revoked":
			sum.Revoked++
		case "online":
			sum.Online++
		default:
			sum.Offline++
		}
		if s.expiring(d) {
			sum.Expiring++
		}
	}
	return sum
}

type overviewData struct {
	Summary  summary
	Expiring []admin.DeviceInfo
	Audit    []store.AuditEvent
}

func (s *Server) overview(w http.ResponseWriter, r *http.Request) {
	infos, err := s.cfg.Admin.DeviceInfos(r.Context())
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	d := overviewData{Summary: s.summarize(infos)}
	for _, info := range infos {
		if s.expiring(info) {
			d.Expiring = append(d.Expiring, info)
		}
	}
	slices.SortFunc(d.Expiring, func(a, b admin.DeviceInfo) int { return a.NotAfter.Compare(b.NotAfter) })
	d.Expiring = d.Expiring[:min(len(d.Expiring), 20)]
	if d.Audit, err = s.cfg.Store.Audit(r.Context(), store.AuditFilter{Limit: 10}); err != nil {
		s.failErr(w, r, err)
		return
	}
	slices.Reverse(d.Audit) // newest first
	s.render(w, r, http.StatusOK, "overview", page{Title: "Overview", Nav: "overview", Events: "/events", Data: d})
}

func (s *Server) apiOverview(w http.ResponseWriter, r *http.Request) {
	infos, err := s.cfg.Admin.DeviceInfos(r.Context())
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.summarize(infos))
}

type deviceRow struct {
	admin.DeviceInfo
	State        string
	Expiring     bool
	AgentVersion string
}

type devicesData struct {
	Q, State, Role string
	Rows           []deviceRow
	Total, Matched int
	Selectable     int // rows not revoked, which may be ticked to revoke
}

func (s *Server) devices(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	d := devicesData{Q: strings.TrimSpace(q.Get("q")), State: q.Get("state"), Role: q.Get("role")}
	infos, err := s.cfg.Admin.DeviceInfos(r.Context())
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	d.Total = len(infos)
	needle := strings.ToLower(d.Q)
	for _, info := range infos {
		row := deviceRow{DeviceInfo: info, State: info.State(), Expiring: s.expiring(info)}
		switch {
		case d.Role != "" && string(info.Role) != d.Role,
			d.State == "expiring" && !row.Expiring,
			d.State != "" && d.State != "expiring" && row.State != d.State,
			needle != "" && !matches(info, needle):
			continue
		}
		d.Matched++
		if len(d.Rows) < s.cfg.MaxRows {
			d.Rows = append(d.Rows, row)
		}
	}
	for i := range d.Rows {
		if d.Rows[i].Role == store.RoleDevice {
			d.Rows[i].AgentVersion = s.agentVersion(r, d.Rows[i].ID)
		}
		if !d.Rows[i].Revoked() {
			d.Selectable++
		}
	}
	s.render(w, r, http.StatusOK, "devices", page{Title: "Devices", Nav: "devices", Events: "/events", Data: d})
}

// matches reports whether a device's id or a label contains needle
// (lowercase).
func matches(d admin.DeviceInfo, needle string) bool {
	return strings.Contains(strings.ToLower(d.ID), needle) || labelsContain(d.Labels, needle)
}

// labelsContain reports whether a key=value of labels contains needle
// (lower case).
func labelsContain(labels map[string]string, needle string) bool {
	for k, v := range labels {
		if strings.Contains(strings.ToLower(k+"="+v), needle) {
			return true
		}
	}
	return false
}

// agentVersionScan is how many of a device's newest messages the device
// list looks through for agent_version: the agent sends it with every
// sample, but a device may publish other telemetry (sub-topics) between.
const agentVersionScan = 20

// agentVersion reads agent_version from the device's newest telemetry
// that carries it.
func (s *Server) agentVersion(r *http.Request, id string) string {
	msgs, err := s.cfg.Store.Telemetry(r.Context(), id, time.Time{}, agentVersionScan)
	if err != nil {
		return ""
	}
	return latestAgentVersion(msgs)
}

// latestAgentVersion is the agent_version of the newest of msgs (oldest
// first) that has one.
func latestAgentVersion(msgs []store.Message) string {
	for i := len(msgs) - 1; i >= 0; i-- {
		if v := stringField(msgs[i].Payload, "agent_version"); v != "" {
			return v
		}
	}
	return ""
}

type deviceData struct {
	Device       admin.DeviceInfo
	Certs        []certRow
	State        string
	Expiring     bool
	AgentVersion string
	Series       string // JSON of []series
	Labels       string // JSON of fieldLabels, for fields that appear live
	Fields       []series
	Samples      int
	MaxPoints    int
	MaxSeries    int
	Latest       *store.Message
	Command      *commandOutcome // a command just sent from the page
	LatestText   string
	Audit        []store.AuditEvent
}

// certRow is one of a device's certificates, as its page lists them.
type certRow struct {
	store.Cert
	State string
}

func (s *Server) device(w http.ResponseWriter, r *http.Request) {
	s.renderDevice(w, r, http.StatusOK, nil)
}

// renderDevice renders the device page, with the outcome of a command
// sent from it when there is one.
func (s *Server) renderDevice(w http.ResponseWriter, r *http.Request, status int, cmd *commandOutcome) {
	id := r.PathValue("id")
	info, err := s.cfg.Admin.DeviceInfo(r.Context(), id)
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	d := deviceData{Device: info, State: info.State(), Expiring: s.expiring(info), MaxPoints: s.cfg.MaxPoints, MaxSeries: maxSeries, Command: cmd}
	now := s.cfg.Now()
	for _, c := range info.Certificates {
		d.Certs = append(d.Certs, certRow{Cert: c, State: info.CertState(c, now)})
	}
	msgs, err := s.cfg.Store.Telemetry(r.Context(), id, time.Time{}, s.cfg.MaxPoints)
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	d.Samples = len(msgs)
	d.Fields = buildSeries(msgs)
	b, err := json.Marshal(d.Fields)
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	d.Series = string(b)
	if b, err = json.Marshal(fieldLabels); err != nil {
		s.failErr(w, r, err)
		return
	}
	d.Labels = string(b)
	// As deep as the device list looks, so that both show the same.
	d.AgentVersion = latestAgentVersion(msgs[max(0, len(msgs)-agentVersionScan):])
	if len(msgs) > 0 {
		m := msgs[len(msgs)-1]
		d.Latest = &m
		d.LatestText = payloadText(m.Payload)
	}
	if d.Audit, err = s.cfg.Store.Audit(r.Context(), store.AuditFilter{DeviceID: id, Limit: 20}); err != nil {
		s.failErr(w, r, err)
		return
	}
	slices.Reverse(d.Audit)
	s.render(w, r, status, "device", page{
		Title: id, Nav: "devices", Events: "/events?device=" + url.QueryEscape(id), Data: d,
	})
}

// payloadText shows a payload: indented when it is JSON, cut when long.
func payloadText(p []byte) string {
	var buf bytes.Buffer
	if json.Indent(&buf, p, "", "  ") == nil {
		p = buf.Bytes()
	}
	const max = 4 << 10
	s := visibleText(string(p))
	if len(s) > max {
		return cut(s, max) + "\n"
	}
	return s
}

func (s *Server) confirmRevokeDevice(w http.ResponseWriter, r *http.Request) {
	info, err := s.cfg.Admin.DeviceInfo(r.Context(), r.PathValue("id"))
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	if info.Revoked() {
		s.fail(w, r, http.StatusConflict, "This identity is already revoked.")
		return
	}
	s.render(w, r, http.StatusOK, "revoke-device", page{Title: "Revoke " + info.ID, Nav: "devices", Data: deviceData{Device: info, State: info.State()}})
}

// confirmed reports whether a POST came from a confirmation page.
func confirmed(r *http.Request) bool { return r.PostFormValue("confirm") == "yes" }

func (s *Server) revokeDevice(w http.ResponseWriter, r *http.Request) {
	if !confirmed(r) {
		s.fail(w, r, http.StatusBadRequest, "Revocation needs confirmation.")
		return
	}
	id := r.PathValue("id")
	if _, err := s.cfg.Admin.RevokeDevice(r.Context(), id, viewerOf(r.Context()).Remote); err != nil {
		s.failErr(w, r, err)
		return
	}
	http.Redirect(w, r, "/devices/"+url.PathEscape(id)+"?flash=revoked", http.StatusSeeOther)
}

// selectedIDs are the identities ticked on the Devices page, in the order
// given, each once.
func selectedIDs(r *http.Request) []string {
	var ids []string
	seen := map[string]bool{}
	for _, id := range r.PostForm["id"] {
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return ids
}

// maxSelected bounds a selection to revoke: a selection comes from one
// Devices page, which lists at most MaxRows identities, and the admin API
// takes at most admin.MaxRevokesPerRequest ids at once.
func (s *Server) maxSelected() int { return min(s.cfg.MaxRows, admin.MaxRevokesPerRequest) }

type revokeSelection struct {
	Rows    []deviceRow
	Revoked int // of Rows, already revoked
}

type revokeOutcomes struct {
	Revoked, Already []admin.RevokeOutcome
}

// revokeDevices answers the Devices page's "Revoke selected…": without
// confirmation, with the page that lists the selection and asks for it;
// with it, by revoking the selection in one request to the admin API (all
// of it, or nothing when an id is unknown), then listing what was done.
func (s *Server) revokeDevices(w http.ResponseWriter, r *http.Request) {
	ids := selectedIDs(r)
	switch {
	case len(ids) == 0:
		s.fail(w, r, http.StatusBadRequest, "No identity was selected, so nothing was revoked: tick the boxes of the identities to revoke on the Devices page, then Revoke selected….")
		return
	case len(ids) > s.maxSelected():
		s.fail(w, r, http.StatusBadRequest, fmt.Sprintf("%d identities were selected; at most %d can be revoked at a time, so nothing was revoked: select fewer (filter the Devices page) and revoke the rest in another round.", len(ids), s.maxSelected()))
		return
	}
	if !confirmed(r) {
		s.confirmRevokeDevices(w, r, ids)
		return
	}
	res, err := s.cfg.Admin.RevokeDevices(r.Context(), ids, viewerOf(r.Context()).Remote)
	if unknown := (*store.UnknownIDsError)(nil); errors.As(err, &unknown) {
		// The admin API's message points to the CLI.
		s.unknownSelected(w, r, unknown.IDs, len(ids))
		return
	}
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	var d revokeOutcomes
	for _, o := range res {
		if o.Result == admin.ResultAlreadyRevoked {
			d.Already = append(d.Already, o)
		} else {
			d.Revoked = append(d.Revoked, o)
		}
	}
	s.render(w, r, http.StatusOK, "devices-revoked", page{Title: "Identities revoked", Nav: "devices", Data: d})
}

// confirmRevokeDevices shows the selection to revoke, refusing it whole
// when an id names no identity, as revoking it would.
func (s *Server) confirmRevokeDevices(w http.ResponseWriter, r *http.Request, ids []string) {
	infos, err := s.cfg.Admin.DeviceInfos(r.Context())
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	byID := make(map[string]admin.DeviceInfo, len(infos))
	for _, info := range infos {
		byID[info.ID] = info
	}
	var d revokeSelection
	var unknown []string
	for _, id := range ids {
		info, ok := byID[id]
		if !ok {
			unknown = append(unknown, id)
			continue
		}
		d.Rows = append(d.Rows, deviceRow{DeviceInfo: info, State: info.State()})
		if info.Revoked() {
			d.Revoked++
		}
	}
	if len(unknown) > 0 {
		s.unknownSelected(w, r, unknown, len(ids))
		return
	}
	s.render(w, r, http.StatusOK, "revoke-devices", page{Title: fmt.Sprintf("Revoke %d identities", len(ids)), Nav: "devices", Data: d})
}

// unknownSelected refuses a selection of total ids of which unknown name
// no identity.
func (s *Server) unknownSelected(w http.ResponseWriter, r *http.Request, unknown []string, total int) {
	s.fail(w, r, http.StatusNotFound, fmt.Sprintf("No identity %s (%d of the %d selected), so nothing was revoked: select again on the Devices page.",
		quoted(unknown, 10), len(unknown), total))
}

// quoted quotes the first most of ids, escaped, and counts the rest.
func quoted(ids []string, most int) string {
	q := make([]string, 0, most)
	for _, id := range ids[:min(len(ids), most)] {
		q = append(q, strconv.Quote(cut(id, 64)))
	}
	out := strings.Join(q, ", ")
	if len(ids) > most {
		out += fmt.Sprintf(" and %d more", len(ids)-most)
	}
	return out
}

type tokensData struct {
	Q, State       string
	Rows           []admin.TokenInfo
	Total, Matched int
}

// tokens lists the newest tokens that match the search: a production line
// mints tens of thousands, and a page of all of them is megabytes.
func (s *Server) tokens(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	d := tokensData{Q: strings.TrimSpace(q.Get("q")), State: q.Get("state")}
	infos, err := s.cfg.Admin.TokenInfos(r.Context())
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	d.Total = len(infos)
	needle := strings.ToLower(d.Q)
	for _, t := range infos {
		if (d.State != "" && t.State != d.State) || (needle != "" && !tokenMatches(t, needle)) {
			continue
		}
		d.Matched++
		if len(d.Rows) < s.cfg.MaxRows {
			d.Rows = append(d.Rows, t)
		}
	}
	s.render(w, r, http.StatusOK, "tokens", page{Title: "Tokens", Nav: "tokens", Data: d})
}

func tokenMatches(t admin.TokenInfo, needle string) bool {
	return strings.Contains(strings.ToLower(t.ID), needle) || strings.Contains(strings.ToLower(t.DeviceID), needle) ||
		labelsContain(t.Labels, needle)
}

// tokenForm is the token creation form, as typed.
type tokenForm struct {
	Device, Prefix, TTL, Labels, Format string
	Count, Uses                         int
	Start                               int  // number of a batch's first id; 0: 1
	Reprovision                         bool // the device exists: enroll it again
	// Replace revokes the usable tokens already bound to the ids in the
	// step that mints the new ones, as `token create --replace` does.
	Replace bool
}

// First and Last are the ids a batch is for.
func (f tokenForm) First() string { return admin.BatchID(f.Prefix, max(1, f.Start)) }
func (f tokenForm) Last() string  { return admin.BatchID(f.Prefix, max(1, f.Start)+max(1, f.Count)-1) }

func parseTokenForm(get func(string) string) (tokenForm, admin.TokenRequest, error) {
	f := tokenForm{
		Device: strings.TrimSpace(get("device")), Prefix: strings.TrimSpace(get("prefix")),
		TTL: strings.TrimSpace(get("ttl")), Labels: strings.TrimSpace(get("labels")), Format: get("format"),
		Reprovision: get("reprovision") == "yes", Replace: get("replace") == "yes",
	}
	var err error
	// Empty means the default; a typed 0 or a negative is a mistake,
	// refused here so that the confirmation page never offers it.
	if f.Count, err = optionalInt(get("count")); err != nil || f.Count < 0 || (f.Count == 0 && strings.TrimSpace(get("count")) != "") {
		return f, admin.TokenRequest{}, errors.New("count must be a number of at least 1")
	}
	if f.Uses, err = optionalInt(get("uses")); err != nil || f.Uses < 0 || (f.Uses == 0 && strings.TrimSpace(get("uses")) != "") {
		return f, admin.TokenRequest{}, errors.New("uses must be a number of at least 1")
	}
	// A batch goes on from the ids already taken: ids are for life.
	if f.Start, err = optionalInt(get("start")); err != nil || f.Start < 0 || (f.Start == 0 && strings.TrimSpace(get("start")) != "") {
		return f, admin.TokenRequest{}, errors.New("the first number of a batch must be a number of at least 1")
	}
	if f.TTL == "" {
		f.TTL = "24h"
	}
	if f.Format != "csv" {
		f.Format = "html"
	}
	ttl, err := admin.ParseDuration(f.TTL)
	if err != nil {
		return f, admin.TokenRequest{}, err
	}
	if ttl <= 0 {
		return f, admin.TokenRequest{}, fmt.Errorf("ttl must be positive, got %q", f.TTL)
	}
	req := admin.TokenRequest{DeviceID: f.Device, Reprovision: f.Reprovision, Replace: f.Replace, Uses: f.Uses, TTL: ttl.String(), Prefix: f.Prefix}
	if f.Count > 1 || f.Prefix != "" {
		req.Count = f.Count
	}
	if f.Start != 0 {
		if req.Count == 0 && f.Prefix == "" {
			return f, admin.TokenRequest{}, errors.New("a first number goes with a batch: give a count and a prefix too")
		}
		req.Start = f.Start
	}
	if f.Labels != "" {
		req.Labels = map[string]string{}
		for part := range strings.SplitSeq(f.Labels, ",") {
			k, v, ok := strings.Cut(part, "=")
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			if !ok || k == "" {
				return f, admin.TokenRequest{}, fmt.Errorf("labels are k=v pairs separated by commas, got %q", part)
			}
			if _, dup := req.Labels[k]; dup {
				return f, admin.TokenRequest{}, fmt.Errorf("label %s is given twice", k)
			}
			req.Labels[k] = v
		}
	}
	return f, req, nil
}

func optionalInt(s string) (int, error) {
	if s = strings.TrimSpace(s); s == "" {
		return 0, nil
	}
	return strconv.Atoi(s)
}

// tokenRefused is a token form refused because usable tokens are already
// bound to some of its ids.
type tokenRefused struct {
	Form   tokenForm
	Count  int           // usable tokens bound to its ids
	Tokens []store.Token // the first maxRefusedRows of them, by bound id
	Again  string        // the confirmation page of the same form with replace ticked
	// After is the batch numbered from the first free number, and
	// AfterURL its confirmation page; a batch only.
	After    tokenForm
	AfterURL string
}

// maxRefusedRows bounds the page of a refused batch: a production line's
// batch may meet thousands of tokens.
const maxRefusedRows = 100

// replacing is the confirmation page of f with replace ticked.
func (f tokenForm) replacing() string {
	f.Replace = true
	return f.confirmURL()
}

// confirmURL is the confirmation page of f.
func (f tokenForm) confirmURL() string {
	q := url.Values{"device": {f.Device}, "prefix": {f.Prefix}, "ttl": {f.TTL}, "labels": {f.Labels}, "format": {f.Format}}
	for name, n := range map[string]int{"count": f.Count, "uses": f.Uses, "start": f.Start} {
		if n != 0 {
			q.Set(name, strconv.Itoa(n))
		}
	}
	if f.Reprovision {
		q.Set("reprovision", "yes")
	}
	if f.Replace {
		q.Set("replace", "yes")
	}
	return "/tokens/new?" + q.Encode()
}

type tokenConfirm struct {
	Form  tokenForm
	Count int    // tokens that will be minted
	Once  string // the form's one-time field (see onceSet)
}

func (s *Server) confirmTokens(w http.ResponseWriter, r *http.Request) {
	f, req, err := parseTokenForm(r.URL.Query().Get)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, err.Error())
		return
	}
	// What can be told before minting is told before the confirmation.
	if err := s.cfg.Admin.CheckTokens(req); err != nil {
		s.failErr(w, r, err)
		return
	}
	s.render(w, r, http.StatusOK, "token-new", page{Title: "Create tokens", Nav: "tokens", Data: tokenConfirm{Form: f, Count: max(1, req.Count), Once: newOnce(s.cfg.Now())}})
}

func (s *Server) createTokens(w http.ResponseWriter, r *http.Request) {
	if !confirmed(r) {
		s.fail(w, r, http.StatusBadRequest, "Token creation needs confirmation.")
		return
	}
	f, req, err := parseTokenForm(r.PostFormValue)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, err.Error())
		return
	}
	// The page showing the secrets answers this POST: reloading it would
	// post again and mint a second batch no one asked for.
	once := r.PostFormValue("once")
	if once == "" {
		s.fail(w, r, http.StatusBadRequest, "This form is incomplete: open Create tokens again.")
		return
	}
	if !s.onces.take(once, s.cfg.Now()) {
		s.fail(w, r, http.StatusConflict, "This form was already submitted (or is over a day old): its tokens were shown once, then, and are not minted again. To make more, open Create tokens again.")
		return
	}
	toks, err := s.cfg.Admin.MintTokens(r.Context(), req, viewerOf(r.Context()).Remote)
	if err != nil {
		s.onces.give(once) // nothing minted: the form may be sent again
		if live := (*store.LiveTokensError)(nil); errors.As(err, &live) {
			// The admin API's message gives CLI advice; here the ways out
			// are a box to tick and the tokens' revoke buttons.
			d := tokenRefused{Form: f, Count: len(live.Tokens), Tokens: live.Tokens[:min(len(live.Tokens), maxRefusedRows)], Again: f.replacing()}
			if f.Prefix != "" {
				next, err := s.cfg.Admin.NextFree(r.Context(), f.Prefix)
				if err != nil {
					s.failErr(w, r, err)
					return
				}
				d.After = f
				d.After.Start = next
				d.AfterURL = d.After.confirmURL()
			}
			s.render(w, r, http.StatusConflict, "token-refused", page{Title: "Tokens not created", Nav: "tokens", Data: d})
			return
		}
		s.failErr(w, r, err)
		return
	}
	if f.Format == "csv" {
		var buf bytes.Buffer
		cw := csv.NewWriter(&buf)
		cw.Write([]string{"id", "token", "expires_at"})
		for _, t := range toks {
			cw.Write([]string{t.DeviceID, t.Secret, t.ExpiresAt.UTC().Format(time.RFC3339)})
		}
		cw.Flush()
		w.Header().Set("Content-Type", "text/csv; charset=utf-8")
		w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="fleetmq-tokens-%s.csv"`, s.cfg.Now().UTC().Format("20060102-150405")))
		w.Header().Set("Cache-Control", "no-store")
		w.Write(buf.Bytes())
		return
	}
	s.render(w, r, http.StatusCreated, "token-created", page{Title: "Tokens created", Nav: "tokens", Data: toks})
}

func (s *Server) findToken(r *http.Request, id string) (store.Token, error) {
	toks, err := s.cfg.Store.Tokens(r.Context())
	if err != nil {
		return store.Token{}, err
	}
	for _, t := range toks {
		if t.ID == id {
			return t, nil
		}
	}
	return store.Token{}, fmt.Errorf("token %s: %w", id, store.ErrNotFound)
}

func (s *Server) confirmRevokeToken(w http.ResponseWriter, r *http.Request) {
	t, err := s.findToken(r, r.PathValue("id"))
	if err != nil {
		s.failErr(w, r, err)
		return
	}
	if !t.RevokedAt.IsZero() {
		s.fail(w, r, http.StatusConflict, "This token is already revoked.")
		return
	}
	s.render(w, r, http.StatusOK, "revoke-token", page{Title: "Revoke token " + t.ID, Nav: "tokens", Data: t})
}

func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) {
	if !confirmed(r) {
		s.fail(w, r, http.StatusBadRequest, "Revocation needs confirmation.")
		return
	}
	if _, err := s.cfg.Admin.RevokeToken(r.Context(), r.PathValue("id"), viewerOf(r.Context()).Remote); err != nil {
		s.failErr(w, r, err)
		return
	}
	http.Redirect(w, r, "/tokens?flash=token-revoked", http.StatusSeeOther)
}

type auditData struct {
	Device, Action string
	Limit          int
	Events         []store.AuditEvent
	Actions        []string
	// Searched is how many of the newest events were looked through when
	// that bound, not the log's end, stopped the search for Action.
	Searched int
}

// maxAuditSearch bounds how deep the audit page reads the log for an
// action, which the store does not filter by: as deep as the newest
// 10,000 events of any action, the page's largest limit, could take.
const maxAuditSearch = 100_000

func (s *Server) audit(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	d := auditData{Device: strings.TrimSpace(q.Get("device")), Action: q.Get("action"), Limit: 200, Actions: store.AuditActions}
	if n, err := strconv.Atoi(q.Get("limit")); err == nil && n > 0 && n <= 10_000 {
		d.Limit = n
	}
	f := store.AuditFilter{DeviceID: d.Device, Limit: d.Limit}
	if d.Action != "" {
		f.Limit = min(10*d.Limit, maxAuditSearch)
	}
	for {
		evs, err := s.cfg.Store.Audit(r.Context(), f)
		if err != nil {
			s.failErr(w, r, err)
			return
		}
		d.Events = d.Events[:0]
		for i := len(evs) - 1; i >= 0 && len(d.Events) < d.Limit; i-- {
			if d.Action == "" || evs[i].Action == d.Action {
				d.Events = append(d.Events, evs[i])
			}
		}
		// A rare action (the revocations among a production line's
		// enrollments) may lie deeper than the first read: read deeper
		// until the page is full or the log ends, rather than show an
		// empty page that reads as "never happened".
		if len(d.Events) >= d.Limit || len(evs) < f.Limit {
			break
		}
		if f.Limit >= maxAuditSearch {
			d.Searched = f.Limit
			break
		}
		f.Limit = min(4*f.Limit, maxAuditSearch)
	}
	s.render(w, r, http.StatusOK, "audit", page{Title: "Audit log", Nav: "audit", Data: d})
}
