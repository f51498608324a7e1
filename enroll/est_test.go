package enroll

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"

	"github.com/fleetmq/fleetmq/store"
	"github.com/fleetmq/fleetmq/store/storetest"
)

// estEnv is the real Handler over real TLS on 127.0.0.1, backed by a real
// store and CA.
type estEnv struct {
	ca     *CA
	db     *store.DB
	srv    *httptest.Server
	caFile string // PEM of the CA chain: the client's explicit trust anchor
	clock  *offsetClock
}

// offsetClock is the handler's clock: real time plus an offset a test may
// move while the server runs.
type offsetClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *offsetClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *offsetClock) Set(off time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.off = off
}

type estOptions struct {
	ca     *CA                // default: a new generated CA
	clock  *offsetClock       // the handler's; default: a new one, at offset 0
	mutate func(*Config)      // edits the handler config
	server func(*http.Server) // edits the HTTP server before it starts
}

func newESTEnv(tb testing.TB, opts estOptions) *estEnv {
	tb.Helper()
	dir := tb.TempDir()
	ca := opts.ca
	if ca == nil {
		var err error
		if ca, err = LoadOrCreateCA(CAConfig{Dir: filepath.Join(dir, "ca")}); err != nil {
			tb.Fatalf("LoadOrCreateCA: %v", err)
		}
	}
	db, err := store.Open(filepath.Join(dir, "fleet.db"), store.Options{})
	if err != nil {
		tb.Fatalf("store.Open: %v", err)
	}
	tb.Cleanup(func() {
		if err := db.Check(); err != nil {
			tb.Errorf("store check: %v", err)
		}
		if err := db.Close(); err != nil {
			tb.Errorf("close store: %v", err)
		}
	})
	clock := opts.clock
	if clock == nil {
		clock = &offsetClock{}
	}
	// Most tests make many refused requests from 127.0.0.1; the limiter
	// has its own test.
	cfg := Config{CA: ca, FailureBurst: 10_000, Now: clock.Now}
	if opts.mutate != nil {
		opts.mutate(&cfg)
	}
	h, err := NewHandler(cfg, db)
	if err != nil {
		tb.Fatalf("NewHandler: %v", err)
	}
	serverCert, err := ca.IssueServer([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		tb.Fatalf("IssueServer: %v", err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequestClientCert,
		MinVersion:   tls.VersionTLS12,
	}
	if opts.server != nil {
		opts.server(srv.Config)
	}
	srv.StartTLS()
	tb.Cleanup(srv.Close)
	caFile := filepath.Join(dir, "ca.pem")
	writeFile(tb, caFile, ca.ChainPEM(), 0o644)
	return &estEnv{ca: ca, db: db, srv: srv, caFile: caFile, clock: clock}
}

// client returns an HTTPS client trusting the CA that presents cert, if any.
func (e *estEnv) client(tb testing.TB, cert *tls.Certificate) *http.Client {
	tb.Helper()
	cfg := &tls.Config{RootCAs: e.ca.Pool(), MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// mintToken stores a bootstrap token the way the admin API does and returns
// its secret; deviceID "" leaves it unbound.
func (e *estEnv) mintToken(tb testing.TB, deviceID string, uses int) string {
	tb.Helper()
	secret, hash, err := NewToken(e.ca.Fingerprint())
	if err != nil {
		tb.Fatal(err)
	}
	now := e.clock.Now()
	t := store.Token{
		ID: TokenID(hash), Hash: hash, DeviceID: deviceID, MaxUses: uses,
		CreatedAt: now, ExpiresAt: now.Add(time.Hour),
	}
	if err := e.db.CreateTokens(context.Background(), []store.Token{t}, "test", now); err != nil {
		tb.Fatalf("CreateTokens: %v", err)
	}
	return secret
}

type estReply struct {
	status int
	header http.Header
	body   []byte
}

func (e *estEnv) do(tb testing.TB, c *http.Client, method, path string, header map[string]string, body []byte) estReply {
	tb.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, bytes.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return estReply{status: resp.StatusCode, header: resp.Header, body: b}
}

// enroll runs a successful simpleenroll with Basic auth and returns the
// issued certificate.
func (e *estEnv) enroll(tb testing.TB, token string, key crypto.Signer, cn string) *x509.Certificate {
	tb.Helper()
	rep := e.do(tb, e.client(tb, nil), http.MethodPost, "/.well-known/est/simpleenroll",
		map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth(cn, token)},
		estBase64Body(estCSR(tb, key, cn)))
	return wantESTCert(tb, rep, key.Public())
}

// snapshot is the fleet state a refused request must leave alone.
func (e *estEnv) snapshot(tb testing.TB) string {
	tb.Helper()
	return storetest.FleetState(tb, e.db)
}

func basicAuth(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// estCSR returns a DER CSR for key with subject CN cn ("" for none).
func estCSR(tb testing.TB, key crypto.Signer, cn string) []byte {
	tb.Helper()
	tmpl := &x509.CertificateRequest{}
	if cn != "" {
		tmpl.Subject = pkix.Name{CommonName: cn}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		tb.Fatalf("create csr: %v", err)
	}
	return der
}

// estBase64Body encodes der the way RFC 2045 mail does: 76-character lines
// ending in CRLF.
func estBase64Body(der []byte) []byte {
	enc := base64.StdEncoding.EncodeToString(der)
	var b bytes.Buffer
	for len(enc) > 76 {
		b.WriteString(enc[:76] + "\r\n")
		enc = enc[76:]
	}
	b.WriteString(enc + "\r\n")
	return b.Bytes()
}

// wantESTCert checks a successful enrollment answer and returns its one
// certificate, which must certify pub.
func wantESTCert(tb testing.TB, rep estReply, pub crypto.PublicKey) *x509.Certificate {
	tb.Helper()
	if rep.status != http.StatusOK {
		tb.Fatalf("status %d, want 200; body %q", rep.status, rep.body)
	}
	if ct := rep.header.Get("Content-Type"); ct != "application/pkcs7-mime; smime-type=certs-only" {
		tb.Errorf("Content-Type %q", ct)
	}
	if cte := rep.header.Get("Content-Transfer-Encoding"); cte != "base64" {
		tb.Errorf("Content-Transfer-Encoding %q", cte)
	}
	certs := parseESTPKCS7(tb, rep.body)
	if len(certs) != 1 {
		tb.Fatalf("answer holds %d certificates, want only the issued one", len(certs))
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if !pub.(equaler).Equal(certs[0].PublicKey) {
		tb.Fatal("issued certificate does not certify the CSR key")
	}
	return certs[0]
}

// parseESTPKCS7 decodes a base64 certs-only PKCS#7 answer.
func parseESTPKCS7(tb testing.TB, body []byte) []*x509.Certificate {
	tb.Helper()
	for _, line := range strings.Split(strings.TrimRight(string(body), "\n"), "\n") {
		if len(line) > 76 {
			tb.Errorf("base64 line of %d characters; RFC 2045 allows 76", len(line))
		}
	}
	der, err := base64.StdEncoding.DecodeString(string(body))
	if err != nil {
		tb.Fatalf("answer is not base64: %v", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		tb.Fatalf("answer is not PKCS#7: %v", err)
	}
	if len(p7.Signers) != 0 || len(p7.Content) != 0 {
		tb.Errorf("answer is not certs-only: %d signers, %d content bytes", len(p7.Signers), len(p7.Content))
	}
	return p7.Certificates
}

// wantESTError checks an RFC 7030 error answer: status, plain text starting
// with the stable code, and a Basic challenge exactly on token failures.
func wantESTError(tb testing.TB, rep estReply, status int, code Code) {
	tb.Helper()
	if rep.status != status {
		tb.Fatalf("status %d, want %d; body %q", rep.status, status, rep.body)
	}
	if ct := rep.header.Get("Content-Type"); ct != "text/plain; charset=utf-8" {
		tb.Errorf("Content-Type %q, want text/plain", ct)
	}
	if !strings.HasPrefix(string(rep.body), string(code)+": ") {
		tb.Errorf("body %q does not start with %q", rep.body, code+": ")
	}
	challenge := rep.header.Get("WWW-Authenticate")
	if tokenCode(code) {
		if challenge != `Basic realm="fleetmq est"` {
			tb.Errorf("WWW-Authenticate %q on %s", challenge, code)
		}
	} else if challenge != "" {
		tb.Errorf("WWW-Authenticate %q on %s", challenge, code)
	}
}

func tlsCert(cert *x509.Certificate, key crypto.Signer) *tls.Certificate {
	return &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}
}

func TestESTSimpleEnroll(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	ctx := context.Background()
	cases := []struct {
		name, path, id, cn string
		auth               func(token string) string
		body               func(der []byte) []byte
	}{
		{
			name: "basic with device id as user", path: "/.well-known/est/simpleenroll", id: "pi-1", cn: "pi-1",
			auth: func(tok string) string { return basicAuth("pi-1", tok) },
		},
		{
			name: "basic without user, id from the bound token", path: "/.well-known/est/simpleenroll", id: "pi-2",
			auth: func(tok string) string { return basicAuth("", tok) },
		},
		{
			name: "bearer", path: "/.well-known/est/simpleenroll", id: "pi-3", cn: "pi-3",
			auth: func(tok string) string { return "Bearer " + tok },
		},
		{
			name: "label alias", path: "/.well-known/est/factory-a/simpleenroll", id: "pi-4", cn: "pi-4",
			auth: func(tok string) string { return basicAuth("pi-4", tok) },
		},
		{
			name: "one line, spaces and tabs", path: "/.well-known/est/simpleenroll", id: "pi-5", cn: "pi-5",
			auth: func(tok string) string { return basicAuth("pi-5", tok) },
			body: func(der []byte) []byte {
				enc := base64.StdEncoding.EncodeToString(der)
				return []byte(" " + enc[:10] + "\t" + enc[10:] + " \n")
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			token := e.mintToken(t, tc.id, 1)
			key := genP256(t)
			der := estCSR(t, key, tc.cn)
			body := estBase64Body(der)
			if tc.body != nil {
				body = tc.body(der)
			}
			rep := e.do(t, e.client(t, nil), http.MethodPost, tc.path,
				map[string]string{"Content-Type": "application/pkcs10", "Authorization": tc.auth(token)}, body)
			cert := wantESTCert(t, rep, key.Public())
			if cert.Subject.CommonName != tc.id {
				t.Errorf("CN %q, want %q", cert.Subject.CommonName, tc.id)
			}
			if _, err := cert.Verify(x509.VerifyOptions{Roots: e.ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Errorf("issued certificate does not verify as a client certificate: %v", err)
			}
			dev, err := e.db.Device(ctx, tc.id)
			if err != nil {
				t.Fatal(err)
			}
			if dev.Serial != SerialHex(cert.SerialNumber) || dev.Role != store.RoleDevice {
				t.Errorf("stored device %+v does not match the issued certificate", dev)
			}
			evs, err := e.db.Audit(ctx, store.AuditFilter{DeviceID: tc.id})
			if err != nil {
				t.Fatal(err)
			}
			var actions []string
			for _, ev := range evs {
				actions = append(actions, ev.Action)
			}
			if !strings.Contains(strings.Join(actions, ","), store.ActTokenUse) {
				t.Errorf("audit %v has no %s", actions, store.ActTokenUse)
			}
		})
	}
}

func TestESTCACerts(t *testing.T) {
	now := time.Now()
	root := newRoot(t, genP256(t), now, nil)
	inter := newIntermediate(t, root, genP256(t), now)
	opCA, err := LoadOrCreateCA(writeOperatorCA(t, certsPEM(inter.cert, root.cert), keyPEM(t, inter.key, "pkcs8"), 0o600))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		ca   *CA
	}{{"generated root", nil}, {"operator intermediate", opCA}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newESTEnv(t, estOptions{ca: tc.ca})
			for _, path := range []string{"/.well-known/est/cacerts", "/.well-known/est/some-label/cacerts"} {
				rep := e.do(t, e.client(t, nil), http.MethodGet, path, nil, nil)
				if rep.status != http.StatusOK {
					t.Fatalf("%s: status %d; body %q", path, rep.status, rep.body)
				}
				if ct := rep.header.Get("Content-Type"); ct != "application/pkcs7-mime" {
					t.Errorf("%s: Content-Type %q", path, ct)
				}
				if cte := rep.header.Get("Content-Transfer-Encoding"); cte != "base64" {
					t.Errorf("%s: Content-Transfer-Encoding %q", path, cte)
				}
				got := parseESTPKCS7(t, rep.body)
				want := e.ca.Chain()
				if len(got) != len(want) {
					t.Fatalf("%s: %d certificates, want %d", path, len(got), len(want))
				}
				for i := range want {
					if !bytes.Equal(got[i].Raw, want[i].Raw) {
						t.Errorf("%s: certificate %d is not chain certificate %d", path, i, i)
					}
				}
			}
		})
	}
}

func TestESTCSRAttrs(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	rep := e.do(t, e.client(t, nil), http.MethodGet, "/.well-known/est/csrattrs", nil, nil)
	if rep.status != http.StatusOK {
		t.Fatalf("status %d; body %q", rep.status, rep.body)
	}
	if ct := rep.header.Get("Content-Type"); ct != "application/csrattrs" {
		t.Errorf("Content-Type %q", ct)
	}
	der, err := base64.StdEncoding.DecodeString(string(rep.body))
	if err != nil {
		t.Fatalf("not base64: %v", err)
	}
	var items []asn1.RawValue
	if rest, err := asn1.Unmarshal(der, &items); err != nil || len(rest) != 0 {
		t.Fatalf("not a DER SEQUENCE: %v (%d trailing bytes)", err, len(rest))
	}
	var gotKey, gotSig bool
	for _, it := range items {
		var oid asn1.ObjectIdentifier
		if _, err := asn1.Unmarshal(it.FullBytes, &oid); err == nil {
			gotSig = gotSig || oid.Equal(asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2})
			continue
		}
		var attr struct {
			Type   asn1.ObjectIdentifier
			Values []asn1.ObjectIdentifier `asn1:"set"`
		}
		if _, err := asn1.Unmarshal(it.FullBytes, &attr); err != nil {
			t.Fatalf("item is neither an OID nor an Attribute: %v", err)
		}
		if attr.Type.Equal(asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}) && len(attr.Values) == 1 &&
			attr.Values[0].Equal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}) {
			gotKey = true
		}
	}
	if !gotKey || !gotSig {
		t.Errorf("csrattrs ask for ecPublicKey/P-256: %v, ecdsa-with-SHA256: %v", gotKey, gotSig)
	}
}

func TestESTEnrollRefused(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	ctx := context.Background()

	// The first use of a single-use token succeeds; everything after is
	// refused without changing the store.
	usedToken := e.mintToken(t, "", 1)
	e.enroll(t, usedToken, genP256(t), "pi-taken")

	token := e.mintToken(t, "", 5)
	boundToken := e.mintToken(t, "pi-bound", 1)
	otherCA := newTestCA(t, nil)
	foreignToken, _, err := NewToken(otherCA.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}

	key := genP256(t)
	good := estCSR(t, key, "pi-new")
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	badSig := bytes.Clone(good)
	badSig[len(badSig)-5] ^= 0xff
	pemCSR := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: good})
	enc := base64.StdEncoding.EncodeToString(good)

	const pkcs10 = "application/pkcs10"
	cases := []struct {
		name   string
		auth   string
		ct     string
		body   []byte
		status int
		code   Code
	}{
		{"PEM instead of base64 DER", basicAuth("", token), pkcs10, pemCSR, 400, CodeCSRInvalid},
		{"base64 of PEM", basicAuth("", token), pkcs10, []byte(base64.StdEncoding.EncodeToString(pemCSR)), 400, CodeCSRInvalid},
		{"binary DER", basicAuth("", token), pkcs10, good, 400, CodeCSRInvalid},
		{"url-safe alphabet", basicAuth("", token), pkcs10, []byte(enc[:8] + "-_" + enc[10:]), 400, CodeCSRInvalid},
		{"truncated base64", basicAuth("", token), pkcs10, []byte(enc[:len(enc)-1]), 400, CodeCSRInvalid},
		{"padding in the middle", basicAuth("", token), pkcs10, []byte(enc[:8] + "====" + enc[8:]), 400, CodeCSRInvalid},
		{"empty body", basicAuth("", token), pkcs10, nil, 400, CodeCSRInvalid},
		{"white space only", basicAuth("", token), pkcs10, []byte(" \r\n\t"), 400, CodeCSRInvalid},
		{"bad signature", basicAuth("", token), pkcs10, estBase64Body(badSig), 400, CodeCSRInvalid},
		{"P-224 key", basicAuth("", token), pkcs10, estBase64Body(estCSR(t, p224, "pi-new")), 400, CodeKeyUnsupported},
		{"bad id", basicAuth("", token), pkcs10, estBase64Body(estCSR(t, key, "Pi New")), 400, CodeIDInvalid},
		{"body too large", basicAuth("", token), pkcs10, bytes.Repeat([]byte("A"), MaxBodySize+4), 413, CodeBodyTooLarge},
		{"wrong content type", basicAuth("", token), "application/json", estBase64Body(good), 415, CodeUnsupportedMedia},
		{"PEM content type", basicAuth("", token), "application/x-pem-file", estBase64Body(good), 415, CodeUnsupportedMedia},
		{"no content type", basicAuth("", token), "", estBase64Body(good), 415, CodeUnsupportedMedia},
		{"no auth", "", pkcs10, estBase64Body(good), 401, CodeTokenMissing},
		{"basic without password", basicAuth("pi-new", ""), pkcs10, estBase64Body(good), 401, CodeTokenMissing},
		{"malformed basic", "Basic !!!", pkcs10, estBase64Body(good), 401, CodeTokenInvalid},
		{"unknown scheme", "Digest " + token, pkcs10, estBase64Body(good), 401, CodeTokenMissing},
		{"malformed token", basicAuth("", token[:20]), pkcs10, estBase64Body(good), 401, CodeTokenInvalid},
		{"token of another CA", basicAuth("", foreignToken), pkcs10, estBase64Body(good), 401, CodeTokenUnknown},
		{"token reuse", basicAuth("pi-new", usedToken), pkcs10, estBase64Body(good), 401, CodeTokenUsed},
		{"token bound to another id", basicAuth("", boundToken), pkcs10, estBase64Body(good), 403, CodeIDMismatch},
		{"two CNs, the last the token's id", basicAuth("", boundToken), pkcs10, estBase64Body(severalCNsCSR(t, key, "zz-evil", "pi-bound")), 400, CodeCSRInvalid},
		{"id taken", basicAuth("", token), pkcs10, estBase64Body(estCSR(t, key, "pi-taken")), 409, CodeIDTaken},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot(t)
			hdr := map[string]string{}
			if tc.auth != "" {
				hdr["Authorization"] = tc.auth
			}
			if tc.ct != "" {
				hdr["Content-Type"] = tc.ct
			}
			rep := e.do(t, e.client(t, nil), http.MethodPost, "/.well-known/est/simpleenroll", hdr, tc.body)
			wantESTError(t, rep, tc.status, tc.code)
			if after := e.snapshot(t); before != after {
				t.Errorf("refused request changed the store:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}

	// Each refusal is audited with its code, and the token id when known.
	evs, err := e.db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	used, err := ParseToken(usedToken)
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, ev := range evs {
		if ev.Action == store.ActTokenFail && ev.TokenID == TokenID(used.Hash) && ev.Detail == string(CodeTokenUsed) {
			found = true
		}
	}
	if !found {
		t.Errorf("no %s audit event for the reused token", store.ActTokenFail)
	}
}

func TestESTReenroll(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	ctx := context.Background()
	key := genP256(t)
	cert := e.enroll(t, e.mintToken(t, "pi-1", 1), key, "pi-1")
	hdr := map[string]string{"Content-Type": "application/pkcs10"}
	const path = "/.well-known/est/simplereenroll"

	// Rekey: a new key, the same subject.
	newKey := genP256(t)
	rep := e.do(t, e.client(t, tlsCert(cert, key)), http.MethodPost, path, hdr, estBase64Body(estCSR(t, newKey, "pi-1")))
	renewed := wantESTCert(t, rep, newKey.Public())
	if renewed.Subject.CommonName != "pi-1" || renewed.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Fatalf("renewed certificate CN %q serial %s", renewed.Subject.CommonName, SerialHex(renewed.SerialNumber))
	}
	dev, err := e.db.Device(ctx, "pi-1")
	if err != nil {
		t.Fatal(err)
	}
	if dev.Serial != SerialHex(renewed.SerialNumber) {
		t.Errorf("device serial %s, want the renewed %s", dev.Serial, SerialHex(renewed.SerialNumber))
	}

	// Renew: the same key again, through a label.
	rep = e.do(t, e.client(t, tlsCert(renewed, newKey)), http.MethodPost, "/.well-known/est/lbl/simplereenroll", hdr,
		estBase64Body(estCSR(t, newKey, "pi-1")))
	current := wantESTCert(t, rep, newKey.Public())

	// Within the grace after expiry, the expired certificate still renews.
	e.clock.Set(time.Until(current.NotAfter) + time.Hour)
	rep = e.do(t, e.client(t, tlsCert(current, newKey)), http.MethodPost, path, hdr, estBase64Body(estCSR(t, newKey, "pi-1")))
	current = wantESTCert(t, rep, newKey.Public())
	e.clock.Set(0)

	revokedKey := genP256(t)
	revoked := e.enroll(t, e.mintToken(t, "pi-revoked", 1), revokedKey, "pi-revoked")
	if _, err := e.db.RevokeDevice(ctx, "pi-revoked", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	otherCA := newTestCA(t, nil)
	foreign, err := otherCA.IssueDevice(key.Public(), "pi-1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		cert   *tls.Certificate
		ct     string
		body   []byte
		clock  time.Duration
		status int
		code   Code
	}{
		{"subject change", tlsCert(current, newKey), "application/pkcs10", estBase64Body(estCSR(t, genP256(t), "pi-2")), 0, 403, CodeIDMismatch},
		{"empty subject", tlsCert(current, newKey), "application/pkcs10", estBase64Body(estCSR(t, genP256(t), "")), 0, 403, CodeIDMismatch},
		{"no client certificate", nil, "application/pkcs10", estBase64Body(estCSR(t, genP256(t), "pi-1")), 0, 401, CodeCertRequired},
		{"certificate of another CA", tlsCert(foreign, key), "application/pkcs10", estBase64Body(estCSR(t, genP256(t), "pi-1")), 0, 401, CodeCertInvalid},
		{"revoked", tlsCert(revoked, revokedKey), "application/pkcs10", estBase64Body(estCSR(t, genP256(t), "pi-revoked")), 0, 403, CodeDeviceRevoked},
		{"expired beyond the grace", tlsCert(current, newKey), "application/pkcs10", estBase64Body(estCSR(t, genP256(t), "pi-1")),
			time.Until(current.NotAfter) + 8*24*time.Hour, 401, CodeCertExpired},
		{"wrong content type", tlsCert(current, newKey), "application/json", estBase64Body(estCSR(t, genP256(t), "pi-1")), 0, 415, CodeUnsupportedMedia},
		{"PEM body", tlsCert(current, newKey), "application/pkcs10",
			pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: estCSR(t, genP256(t), "pi-1")}), 0, 400, CodeCSRInvalid},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.clock.Set(tc.clock)
			t.Cleanup(func() { e.clock.Set(0) })
			before := e.snapshot(t)
			rep := e.do(t, e.client(t, tc.cert), http.MethodPost, path, map[string]string{"Content-Type": tc.ct}, tc.body)
			wantESTError(t, rep, tc.status, tc.code)
			if after := e.snapshot(t); before != after {
				t.Errorf("refused request changed the store:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
}

func TestESTOtherAnswers(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	c := e.client(t, nil)
	rep := e.do(t, c, http.MethodGet, "/.well-known/est/simpleenroll", nil, nil)
	wantESTError(t, rep, 405, CodeMethod)
	rep = e.do(t, c, http.MethodPost, "/.well-known/est/serverkeygen", map[string]string{"Content-Type": "application/pkcs10"}, []byte("AA=="))
	wantESTError(t, rep, 404, CodeNotFound)
	rep = e.do(t, c, http.MethodGet, "/.well-known/est/a/b/cacerts", nil, nil)
	wantESTError(t, rep, 404, CodeNotFound)
	rep = e.do(t, c, http.MethodPost, "/.well-known/est/simpleenroll",
		map[string]string{"Content-Type": "application/pkcs10", "X-Big": strings.Repeat("x", maxHeaderValue+1)}, []byte("AA=="))
	wantESTError(t, rep, 431, CodeHeaderTooLarge)
	// The /v1 API keeps its JSON errors.
	rep = e.do(t, c, http.MethodGet, "/v1/enroll", nil, nil)
	if rep.status != 405 || rep.header.Get("Content-Type") != "application/json" {
		t.Errorf("/v1 error: status %d, Content-Type %q", rep.status, rep.header.Get("Content-Type"))
	}
}

func TestESTRateLimited(t *testing.T) {
	e := newESTEnv(t, estOptions{mutate: func(c *Config) {
		c.FailureBurst = 2
		c.FailureRate = 0.001
	}})
	ctx := context.Background()
	c := e.client(t, nil)
	token := e.mintToken(t, "pi-1", 1)
	key := genP256(t)
	body := estBase64Body(estCSR(t, key, "pi-1"))
	post := func(path, auth string) estReply {
		hdr := map[string]string{"Content-Type": "application/pkcs10"}
		if auth != "" {
			hdr["Authorization"] = auth
		}
		return e.do(t, c, http.MethodPost, path, hdr, body)
	}
	// Waiting for the challenge is how some clients start; it is no
	// failure, however often it happens.
	for range 5 {
		wantESTError(t, post("/.well-known/est/simpleenroll", ""), 401, CodeTokenMissing)
	}
	evs, err := e.db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range evs {
		if ev.Action == store.ActTokenFail {
			t.Fatalf("a request without credentials was audited as a failure: %+v", ev)
		}
	}
	for range 2 {
		wantESTError(t, post("/.well-known/est/simpleenroll", basicAuth("pi-1", "not-a-token")), 401, CodeTokenInvalid)
	}
	before := e.snapshot(t)
	// Now even a good request waits; so does re-enrollment. A refusal by
	// the limiter is not audited: the limiter is what keeps a flood of
	// failures out of the audit log.
	evs = newAudit(t, e, func() {
		for _, path := range []string{"/.well-known/est/simpleenroll", "/.well-known/est/simplereenroll"} {
			rep := post(path, basicAuth("pi-1", token))
			wantESTError(t, rep, 429, CodeRateLimited)
			secs, err := strconv.Atoi(rep.header.Get("Retry-After"))
			if err != nil || secs < 1 {
				t.Errorf("%s: Retry-After %q", path, rep.header.Get("Retry-After"))
			}
		}
	})
	if after := e.snapshot(t); before != after {
		t.Errorf("rate-limited request changed the store")
	}
	if len(evs) != 0 {
		t.Errorf("rate-limited requests were audited: %+v", evs)
	}
}

func TestSameSubject(t *testing.T) {
	type attr struct {
		oid asn1.ObjectIdentifier
		tag int
		val string
	}
	oidCN, oidO := asn1.ObjectIdentifier{2, 5, 4, 3}, asn1.ObjectIdentifier{2, 5, 4, 10}
	name := func(tb testing.TB, attrs ...attr) []byte {
		tb.Helper()
		rdns := pkix.RDNSequence{}
		for _, a := range attrs {
			rdns = append(rdns, pkix.RelativeDistinguishedNameSET{{Type: a.oid, Value: asn1.RawValue{Tag: a.tag, Bytes: []byte(a.val)}}})
		}
		der, err := asn1.Marshal(rdns)
		if err != nil {
			tb.Fatal(err)
		}
		return der
	}
	cn := func(s string) attr { return attr{oidCN, asn1.TagPrintableString, s} }
	utf8CN := func(s string) attr { return attr{oidCN, asn1.TagUTF8String, s} }
	org := func(s string) attr { return attr{oidO, asn1.TagUTF8String, s} }

	sanExt := func(tb testing.TB, dns string) pkix.Extension {
		tb.Helper()
		v, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte(dns)}})
		if err != nil {
			tb.Fatal(err)
		}
		return pkix.Extension{Id: oidSubjectAltName, Value: v}
	}
	leaf := &x509.Certificate{RawSubject: name(t, cn("pi-1"))}
	leafWithSAN := &x509.Certificate{RawSubject: name(t, cn("pi-1")), Extensions: []pkix.Extension{sanExt(t, "pi-1.local")}}
	cases := []struct {
		name string
		leaf *x509.Certificate
		csr  *x509.CertificateRequest
		ok   bool
	}{
		{"identical", leaf, &x509.CertificateRequest{RawSubject: name(t, cn("pi-1"))}, true},
		{"UTF8String CN as OpenSSL writes it", leaf, &x509.CertificateRequest{RawSubject: name(t, utf8CN("pi-1"))}, true},
		{"other CN", leaf, &x509.CertificateRequest{RawSubject: name(t, cn("pi-2"))}, false},
		{"case differs", leaf, &x509.CertificateRequest{RawSubject: name(t, cn("PI-1"))}, false},
		{"extra attribute", leaf, &x509.CertificateRequest{RawSubject: name(t, cn("pi-1"), org("acme"))}, false},
		{"empty subject", leaf, &x509.CertificateRequest{RawSubject: name(t)}, false},
		{"garbage subject", leaf, &x509.CertificateRequest{RawSubject: []byte{0x30, 0x05}}, false},
		{"SAN added", leaf, &x509.CertificateRequest{RawSubject: name(t, cn("pi-1")), Extensions: []pkix.Extension{sanExt(t, "x.example")}}, false},
		{"SAN kept", leafWithSAN, &x509.CertificateRequest{RawSubject: name(t, cn("pi-1")), Extensions: []pkix.Extension{sanExt(t, "pi-1.local")}}, true},
		{"SAN dropped", leafWithSAN, &x509.CertificateRequest{RawSubject: name(t, cn("pi-1"))}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := sameSubject(tc.leaf, tc.csr)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok {
				wantCode(t, err, CodeIDMismatch)
			}
		})
	}
}

func TestDecodeESTCSR(t *testing.T) {
	key := genP256(t)
	der := estCSR(t, key, "pi-1")
	enc := base64.StdEncoding.EncodeToString(der)
	for _, body := range []string{
		enc,
		string(estBase64Body(der)),
		"\r\n " + strings.Join(strings.SplitAfter(enc, "A"), "\n") + "\t\r\n",
	} {
		csr, err := decodeESTCSR([]byte(body))
		if err != nil {
			t.Fatalf("decode %q: %v", body, err)
		}
		if !bytes.Equal(csr.Raw, der) {
			t.Fatal("decoded CSR differs")
		}
	}
	_, err := decodeESTCSR(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	wantCode(t, err, CodeCSRInvalid)
	if e := (*Error)(nil); !errors.As(err, &e) || !strings.Contains(e.Message, "PEM") {
		t.Errorf("PEM refusal does not say PEM: %v", err)
	}
	// A last group whose unused bits are not zero is another spelling of
	// the same bytes; only the canonical one is accepted. ECDSA signatures
	// vary in length, so some CSR soon has a length that needs padding.
	for range 100 {
		if len(der)%3 != 0 {
			break
		}
		der = estCSR(t, key, "pi-1")
	}
	if len(der)%3 == 0 {
		t.Fatal("no CSR with a padded encoding in 100 tries")
	}
	enc = base64.StdEncoding.EncodeToString(der)
	if _, err := decodeESTCSR([]byte(enc)); err != nil {
		t.Fatalf("canonical encoding refused: %v", err)
	}
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	i := strings.IndexByte(enc, '=') - 1
	nonCanonical := enc[:i] + string(alphabet[strings.IndexByte(alphabet, enc[i])|1]) + enc[i+1:]
	_, err = decodeESTCSR([]byte(nonCanonical))
	wantCode(t, err, CodeCSRInvalid)
}

func FuzzESTDecode(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	der := estCSR(f, key, "pi-1")
	enc := base64.StdEncoding.EncodeToString(der)
	f.Add([]byte(enc))
	f.Add(estBase64Body(der))
	f.Add([]byte(" " + enc[:7] + "\t" + enc[7:] + "\n"))
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	f.Add([]byte(base64.StdEncoding.EncodeToString(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))))
	f.Add(der)
	f.Add([]byte("MAA="))
	f.Add([]byte("===="))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, body []byte) {
		csr, err := decodeESTCSR(body)
		if !checkCSROutcome(t, csr, err) {
			return
		}
		// An accepted body is the one canonical base64 of the CSR, give or
		// take white space.
		stripped := strings.Map(func(r rune) rune {
			if strings.ContainsRune(" \t\r\n", r) {
				return -1
			}
			return r
		}, string(body))
		if stripped != base64.StdEncoding.EncodeToString(csr.Raw) {
			t.Fatalf("accepted a non-canonical encoding %q", body)
		}
	})
}

// The RFC 7030 client flow with the tools an operator has at hand: openssl
// makes the key and the CSR, curl talks EST, base64 and openssl read the
// answers. The helpers below are the recipe of the README's "Enrolling with
// EST" section; estEnrollWithTools returns PEM files ready for
// mosquitto_pub --cert/--key.

func requireTools(tb testing.TB, names ...string) {
	tb.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			tb.Skipf("%s is not installed", n)
		}
	}
}

// runTool runs name in dir and returns its standard output. Arguments are
// not echoed on failure: curl's carry the token.
func runTool(tb testing.TB, dir, name string, args ...string) []byte {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		tb.Fatalf("%s failed: %v\n%s", name, err, stderr.Bytes())
	}
	return out
}

// opensslCSR makes a P-256 key and a CSR for subject with openssl req, DER
// then base64, and returns the key's and the base64 CSR's paths.
func opensslCSR(tb testing.TB, dir, name, subject string) (keyPath, csrB64Path string) {
	tb.Helper()
	keyPath = filepath.Join(dir, name+".key")
	der := filepath.Join(dir, name+".csr.der")
	csrB64Path = filepath.Join(dir, name+".csr.b64")
	runTool(tb, dir, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", keyPath, "-subj", subject, "-outform", "DER", "-out", der)
	runTool(tb, dir, "openssl", "base64", "-in", der, "-out", csrB64Path)
	return keyPath, csrB64Path
}

// curlEST runs curl against the server, writing the answer body to out, and
// returns the HTTP status.
func curlEST(tb testing.TB, dir, caFile, out string, args ...string) int {
	tb.Helper()
	args = append([]string{"-sS", "--cacert", caFile, "-o", out, "-w", "%{http_code}"}, args...)
	code, err := strconv.Atoi(string(runTool(tb, dir, "curl", args...)))
	if err != nil {
		tb.Fatalf("curl status: %v", err)
	}
	return code
}

// pkcs7ToPEM decodes a base64 certs-only answer with base64 -d and prints
// its certificates as PEM with openssl pkcs7.
func pkcs7ToPEM(tb testing.TB, dir, b64Path, pemPath string) {
	tb.Helper()
	der := strings.TrimSuffix(b64Path, ".b64") + ".der"
	writeFile(tb, der, runTool(tb, dir, "base64", "-d", b64Path), 0o644)
	runTool(tb, dir, "openssl", "pkcs7", "-inform", "DER", "-in", der, "-print_certs", "-out", pemPath)
}

// estEnrollWithTools enrolls device id at baseURL with token, trusting
// caFile, using only openssl, curl and base64, and returns the paths of the
// certificate and key PEM files.
func estEnrollWithTools(tb testing.TB, dir, baseURL, caFile, id, token string) (certPath, keyPath string) {
	tb.Helper()
	keyPath, csr := opensslCSR(tb, dir, id, "/CN="+id)
	answer := filepath.Join(dir, id+".p7.b64")
	status := curlEST(tb, dir, caFile, answer, "-u", id+":"+token, "-H", "Content-Type: application/pkcs10",
		"--data-binary", "@"+csr, baseURL+"/.well-known/est/simpleenroll")
	if status != http.StatusOK {
		body, _ := os.ReadFile(answer)
		tb.Fatalf("simpleenroll: status %d: %s", status, body)
	}
	certPath = filepath.Join(dir, id+".pem")
	pkcs7ToPEM(tb, dir, answer, certPath)
	return certPath, keyPath
}

func readPEMCert(tb testing.TB, path string) *x509.Certificate {
	tb.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			tb.Fatal(err)
		}
		certs = append(certs, c)
	}
	if len(certs) != 1 {
		tb.Fatalf("%s holds %d certificates, want 1", filepath.Base(path), len(certs))
	}
	return certs[0]
}

func readPEMKey(tb testing.TB, path string) crypto.Signer {
	tb.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		tb.Fatalf("%s is not PEM", filepath.Base(path))
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	return key.(crypto.Signer)
}

func TestESTWithOpenSSLAndCurl(t *testing.T) {
	requireTools(t, "openssl", "curl", "base64")
	e := newESTEnv(t, estOptions{})
	ctx := context.Background()
	dir := t.TempDir()
	url := e.srv.URL
	type equaler interface{ Equal(crypto.PublicKey) bool }

	// Trust: the CA chain from cacerts, as an EST client bootstraps it.
	cacerts := filepath.Join(dir, "cacerts.b64")
	if status := curlEST(t, dir, e.caFile, cacerts, url+"/.well-known/est/cacerts"); status != http.StatusOK {
		t.Fatalf("cacerts: status %d", status)
	}
	cacertsPEM := filepath.Join(dir, "cacerts.pem")
	pkcs7ToPEM(t, dir, cacerts, cacertsPEM)

	verify := func(t *testing.T, certPath string) {
		t.Helper()
		out := runTool(t, dir, "openssl", "verify", "-CAfile", cacertsPEM, "-purpose", "sslclient", certPath)
		if !bytes.HasSuffix(bytes.TrimSpace(out), []byte(": OK")) {
			t.Fatalf("openssl verify: %s", out)
		}
	}

	certPath, keyPath := estEnrollWithTools(t, dir, url, e.caFile, "pi-7", e.mintToken(t, "", 1))
	verify(t, certPath)
	cert := readPEMCert(t, certPath)
	if cert.Subject.CommonName != "pi-7" || !readPEMKey(t, keyPath).Public().(equaler).Equal(cert.PublicKey) {
		t.Fatalf("certificate for %q does not certify the openssl key", cert.Subject.CommonName)
	}
	dev, err := e.db.Device(ctx, "pi-7")
	if err != nil {
		t.Fatal(err)
	}
	if dev.Serial != SerialHex(cert.SerialNumber) {
		t.Fatalf("device serial %s, issued %s", dev.Serial, SerialHex(cert.SerialNumber))
	}

	// Re-enrollment with a new key, authenticated by curl --cert/--key.
	// OpenSSL writes the CN as UTF8String, Go as PrintableString: the same
	// subject all the same.
	newKey, csr := opensslCSR(t, dir, "pi-7-next", "/CN=pi-7")
	answer := filepath.Join(dir, "pi-7-next.p7.b64")
	status := curlEST(t, dir, e.caFile, answer, "--cert", certPath, "--key", keyPath,
		"-H", "Content-Type: application/pkcs10", "--data-binary", "@"+csr, url+"/.well-known/est/simplereenroll")
	if status != http.StatusOK {
		body, _ := os.ReadFile(answer)
		t.Fatalf("simplereenroll: status %d: %s", status, body)
	}
	nextPath := filepath.Join(dir, "pi-7-next.pem")
	pkcs7ToPEM(t, dir, answer, nextPath)
	verify(t, nextPath)
	next := readPEMCert(t, nextPath)
	if next.Subject.CommonName != "pi-7" || !readPEMKey(t, newKey).Public().(equaler).Equal(next.PublicKey) {
		t.Fatal("re-enrolled certificate does not certify the new key")
	}
	if dev, err = e.db.Device(ctx, "pi-7"); err != nil || dev.Serial != SerialHex(next.SerialNumber) {
		t.Fatalf("device after re-enrollment: %+v, %v", dev, err)
	}

	// A subject change is refused: 403, plain text, store untouched.
	before := e.snapshot(t)
	_, csr = opensslCSR(t, dir, "pi-8", "/CN=pi-8")
	answer = filepath.Join(dir, "pi-8.txt")
	status = curlEST(t, dir, e.caFile, answer, "--cert", nextPath, "--key", newKey,
		"-H", "Content-Type: application/pkcs10", "--data-binary", "@"+csr, url+"/.well-known/est/simplereenroll")
	body, err := os.ReadFile(answer)
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusForbidden || !bytes.HasPrefix(body, []byte(string(CodeIDMismatch)+": ")) {
		t.Fatalf("subject change: status %d: %s", status, body)
	}
	if after := e.snapshot(t); before != after {
		t.Fatal("refused subject change changed the store")
	}

	// The PEM file itself, where base64 DER belongs, is refused.
	pemCSR := filepath.Join(dir, "pi-9.csr.pem")
	pkey, _ := opensslCSR(t, dir, "pi-9", "/CN=pi-9")
	runTool(t, dir, "openssl", "req", "-new", "-key", pkey, "-subj", "/CN=pi-9", "-out", pemCSR)
	answer = filepath.Join(dir, "pi-9.txt")
	status = curlEST(t, dir, e.caFile, answer, "-u", "pi-9:"+e.mintToken(t, "", 1), "-H", "Content-Type: application/pkcs10",
		"--data-binary", "@"+pemCSR, url+"/.well-known/est/simpleenroll")
	if body, _ := os.ReadFile(answer); status != http.StatusBadRequest || !bytes.HasPrefix(body, []byte(string(CodeCSRInvalid)+": ")) {
		t.Fatalf("PEM body: status %d: %s", status, body)
	}
}
