package admin

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// recordingStore is a Store that records what the admin API writes. Reads
// return nothing; the fuzz targets only drive the write endpoints.
type recordingStore struct {
	mu         sync.Mutex
	tokens     [][]store.Token
	identities []store.Device
	certs      []store.Cert
}

func (s *recordingStore) CreateTokens(_ context.Context, toks []store.Token, _ string, _ time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens = append(s.tokens, toks)
	return nil
}

func (s *recordingStore) ReplaceTokens(ctx context.Context, toks []store.Token, remote string, now time.Time) error {
	return s.CreateTokens(ctx, toks, remote, now)
}

func (s *recordingStore) CreateIdentity(_ context.Context, d store.Device, c store.Cert, _ string, _ time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.identities = append(s.identities, d)
	s.certs = append(s.certs, c)
	return nil
}

func (s *recordingStore) Renew(_ context.Context, r store.Renewal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.certs = append(s.certs, r.Cert)
	return nil
}

func (s *recordingStore) Tokens(context.Context) ([]store.Token, error) { return nil, nil }
func (s *recordingStore) RevokeToken(context.Context, string, string, time.Time) (store.Token, error) {
	return store.Token{}, store.ErrNotFound
}
func (s *recordingStore) Device(context.Context, string) (store.Device, error) {
	return store.Device{}, store.ErrNotFound
}
func (s *recordingStore) Devices(context.Context) ([]store.Device, error) { return nil, nil }
func (s *recordingStore) DeviceCerts(context.Context, string) ([]store.Cert, error) {
	return nil, store.ErrNotFound
}
func (s *recordingStore) RevokeDevice(context.Context, string, string, time.Time) ([]store.Cert, error) {
	return nil, store.ErrNotFound
}
func (s *recordingStore) RevokeDevices(_ context.Context, ids []string, _ string, _ time.Time) ([]store.DeviceRevocation, error) {
	return nil, &store.UnknownIDsError{IDs: ids}
}
func (s *recordingStore) Audit(context.Context, store.AuditFilter) ([]store.AuditEvent, error) {
	return nil, nil
}
func (s *recordingStore) Telemetry(context.Context, string, time.Time, int) ([]store.Message, error) {
	return nil, nil
}
func (s *recordingStore) Presences(context.Context) (map[string]store.Presence, error) {
	return nil, nil
}
func (s *recordingStore) Backup(context.Context, io.Writer, func(int64)) (int64, error) {
	return 0, store.ErrClosed
}
func (s *recordingStore) AppendAudit(context.Context, ...store.AuditEvent) error { return nil }

// fuzzMaxTokens keeps each fuzz input cheap: minting costs a random secret
// per token.
const fuzzMaxTokens = 16

func newFuzzHandler(tb testing.TB) (*Handler, *recordingStore, *enroll.CA, time.Time) {
	tb.Helper()
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: tb.TempDir()})
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	st := &recordingStore{}
	h, err := New(Config{CA: ca, MaxTokensPerRequest: fuzzMaxTokens, Now: func() time.Time { return now }}, st)
	if err != nil {
		tb.Fatal(err)
	}
	return h, st, ca, now
}

// post sends body to the admin handler and returns the status and the
// error code of a refusal.
func post(tb testing.TB, h http.Handler, path string, body []byte) (int, string, []byte) {
	tb.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
	if rec.Code >= 400 {
		var e struct{ Code string }
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Code == "" {
			tb.Fatalf("%d with a body that is not a JSON error: %q", rec.Code, rec.Body.Bytes())
		}
		return rec.Code, e.Code, rec.Body.Bytes()
	}
	return rec.Code, "", rec.Body.Bytes()
}

// FuzzTokenRequest fuzzes POST /v1/tokens: the JSON decoding of a
// TokenRequest and MintTokens' validation. The property: whatever is
// accepted satisfies every documented bound, and is exactly what was stored;
// whatever is refused is a 400 that stored nothing.
func FuzzTokenRequest(f *testing.F) {
	for _, s := range []string{
		`{}`,
		`{"device_id":"pi-1"}`,
		`{"uses":5,"ttl":"2h","labels":{"site":"lab"}}`,
		`{"count":3,"prefix":"pi-","start":9998}`,
		`{"count":-3}`,
		`{"count":0,"prefix":"pi-"}`,
		`{"uses":-1}`,
		`{"uses":1000001}`,
		`{"ttl":"-1h"}`,
		`{"ttl":"9000h"}`,
		`{"ttl":"1ns"}`,
		`{"start":5}`,
		`{"count":2,"device_id":"x"}`,
		`{"count":2,"prefix":"A/"}`,
		`{"count":16,"start":999999990}`,
		`{"labels":{"a=b":"c"}}`,
		`{"labels":{"":"c"}}`,
		`{"device_id":"pi-1","unknown":true}`,
		`{"device_id":"pi-1"} {}`,
		`{"device_id":"dev/../x"}`,
		`[]`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	h, st, ca, now := newFuzzHandler(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		st.mu.Lock()
		before := len(st.tokens)
		st.mu.Unlock()
		status, code, out := post(t, h, "/v1/tokens", body)
		st.mu.Lock()
		stored := st.tokens[before:]
		st.mu.Unlock()
		if status != http.StatusCreated {
			if status != http.StatusBadRequest || (code != string(enroll.CodeBadRequest) && code != string(enroll.CodeIDInvalid)) {
				t.Fatalf("refused with %d %s, want 400 bad_request or id_invalid", status, code)
			}
			if len(stored) != 0 {
				t.Fatal("a refused request stored tokens")
			}
			return
		}
		var req TokenRequest
		if err := json.Unmarshal(body, &req); err != nil {
			t.Fatalf("accepted a body encoding/json refuses: %v", err)
		}
		var toks []NewToken
		if err := json.Unmarshal(out, &toks); err != nil {
			t.Fatalf("answer: %v", err)
		}
		if len(stored) != 1 || len(stored[0]) != len(toks) {
			t.Fatalf("answered %d tokens, stored %d batches", len(toks), len(stored))
		}
		want := 1
		if req.Count != 0 || req.Prefix != "" {
			if req.Count < 1 || req.Count > fuzzMaxTokens {
				t.Fatalf("accepted count %d outside 1..%d", req.Count, fuzzMaxTokens)
			}
			want = req.Count
		} else if req.Start != 0 {
			t.Fatal("accepted start without count")
		}
		if len(toks) != want {
			t.Fatalf("minted %d tokens, want %d", len(toks), want)
		}
		wantUses := req.Uses
		if wantUses == 0 {
			wantUses = 1
		}
		wantTTL := 24 * time.Hour
		if req.TTL != "" {
			var err error
			if wantTTL, err = ParseDuration(req.TTL); err != nil { // the API takes days too
				t.Fatalf("accepted ttl %q: %v", req.TTL, err)
			}
		}
		if wantTTL <= 0 || wantTTL > maxTokenTTL {
			t.Fatalf("accepted ttl %s", wantTTL)
		}
		if len(req.Labels) > maxLabels {
			t.Fatalf("accepted %d labels", len(req.Labels))
		}
		for k, v := range req.Labels {
			if k == "" || len(k) > maxLabelLen || len(v) > maxLabelLen || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
				t.Fatalf("accepted label %q=%q", k, v)
			}
		}
		ids := map[string]bool{}
		for i, tok := range toks {
			rec := stored[0][i]
			// The hash is never in the answer (json:"-"); the secret is checked against it below.
			if tok.ID != rec.ID || tok.DeviceID != rec.DeviceID || tok.MaxUses != rec.MaxUses || !tok.ExpiresAt.Equal(rec.ExpiresAt) {
				t.Fatalf("token %d answered differs from the one stored", i)
			}
			if rec.MaxUses != wantUses || rec.MaxUses < 1 || rec.MaxUses > 1_000_000 {
				t.Fatalf("max uses %d, want %d within 1..1000000", rec.MaxUses, wantUses)
			}
			if rec.Uses != 0 || !rec.RevokedAt.IsZero() {
				t.Fatal("a new token is used or revoked")
			}
			if !rec.CreatedAt.Equal(now) || rec.ExpiresAt.Sub(rec.CreatedAt) != wantTTL {
				t.Fatalf("token lives %s, want %s", rec.ExpiresAt.Sub(rec.CreatedAt), wantTTL)
			}
			pt, err := enroll.ParseToken(tok.Secret)
			if err != nil || pt.Hash != rec.Hash || pt.CAFingerprint != ca.Fingerprint() || enroll.TokenID(pt.Hash) != rec.ID {
				t.Fatalf("secret does not match the stored token (%v)", err)
			}
			switch {
			case req.Count != 0 || req.Prefix != "":
				if !strings.HasPrefix(rec.DeviceID, req.Prefix) || ids[rec.DeviceID] {
					t.Fatalf("bulk id %q: not under prefix %q or repeated", rec.DeviceID, req.Prefix)
				}
				// A number's id never depends on the batch.
				if want := BatchID(req.Prefix, max(req.Start, 1)+i); rec.DeviceID != want {
					t.Fatalf("bulk id %q, want %q", rec.DeviceID, want)
				}
				ids[rec.DeviceID] = true
			case rec.DeviceID != req.DeviceID:
				t.Fatalf("bound to %q, asked %q", rec.DeviceID, req.DeviceID)
			}
			if rec.DeviceID != "" {
				if err := enroll.ValidateID(rec.DeviceID); err != nil {
					t.Fatalf("token bound to an invalid id: %v", err)
				}
			}
		}
	})
}

// FuzzIdentityRequest fuzzes POST /v1/identities. The property: a
// certificate is issued only for a service or operator with a valid name,
// for the key of a CSR that verifies, with that name as its CN and nothing
// else; refusals are 4xx that stored nothing.
func FuzzIdentityRequest(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "ignored"}}, key)
	if err != nil {
		f.Fatal(err)
	}
	csr := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	body := func(name, role, csr string) []byte {
		b, _ := json.Marshal(map[string]string{"name": name, "role": role, "csr": csr})
		return b
	}
	f.Add(body("backend", "service", csr))
	f.Add(body("alice", "operator", csr))
	f.Add(body("pi-1", "device", csr))
	f.Add(body("Backend", "service", csr))
	f.Add(body("back/end", "service", csr))
	f.Add(body("backend", "service", strings.Replace(csr, "A", "B", 3)))
	f.Add(body("backend", "service", ""))
	f.Add([]byte(`{"name":"backend","role":"service","csr":"x","admin":true}`))
	f.Add([]byte(`{}`))
	h, st, ca, _ := newFuzzHandler(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		st.mu.Lock()
		before := len(st.identities)
		st.mu.Unlock()
		status, code, out := post(t, h, "/v1/identities", in)
		st.mu.Lock()
		stored := st.identities[before:]
		certs := st.certs[before:]
		st.mu.Unlock()
		if status != http.StatusCreated {
			if status < 400 || status >= 500 {
				t.Fatalf("refused with %d %s, want a client error", status, code)
			}
			if len(stored) != 0 {
				t.Fatal("a refused request stored an identity")
			}
			return
		}
		var req IdentityRequest
		if err := json.Unmarshal(in, &req); err != nil {
			t.Fatalf("accepted a body encoding/json refuses: %v", err)
		}
		if req.Role != store.RoleService && req.Role != store.RoleOperator {
			t.Fatalf("issued an identity with role %q", req.Role)
		}
		if err := enroll.ValidateID(req.Name); err != nil {
			t.Fatalf("issued an identity with an invalid name: %v", err)
		}
		if len(stored) != 1 || stored[0].ID != req.Name || stored[0].Role != req.Role {
			t.Fatalf("stored %+v for %q/%q", stored, req.Name, req.Role)
		}
		var resp IdentityResponse
		if err := json.Unmarshal(out, &resp); err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode([]byte(resp.Certificate))
		if block == nil {
			t.Fatal("no certificate in the answer")
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if cert.Subject.CommonName != req.Name || len(cert.DNSNames)+len(cert.IPAddresses)+len(cert.URIs)+len(cert.EmailAddresses) != 0 {
			t.Fatalf("certificate names %q %v, want only CN %q", cert.Subject.CommonName, cert.DNSNames, req.Name)
		}
		if !bytes.Equal(certs[0].DER, cert.Raw) || certs[0].DeviceID != req.Name {
			t.Fatal("the stored certificate is not the one answered")
		}
		parsed, err := enroll.ParseCSR([]byte(req.CSR))
		if err != nil {
			t.Fatalf("issued for a CSR ParseCSR refuses: %v", err)
		}
		if !publicKeyEqual(cert.PublicKey, parsed.PublicKey) {
			t.Fatal("certificate key is not the CSR's")
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), CurrentTime: cert.NotBefore.Add(time.Minute), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatalf("issued certificate does not verify as a client certificate: %v", err)
		}
	})
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
