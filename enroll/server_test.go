package enroll

import (
	"bufio"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// newOperatorCAEnv is an estEnv whose CA is an operator root the test holds
// the key of, so that it can sign client certificates the handler never
// issued.
func newOperatorCAEnv(tb testing.TB) (*estEnv, testCert) {
	tb.Helper()
	root := newRoot(tb, genP256(tb), time.Now(), nil)
	ca, err := LoadOrCreateCA(writeOperatorCA(tb, certsPEM(root.cert), keyPEM(tb, root.key, "pkcs8"), 0o600))
	if err != nil {
		tb.Fatalf("LoadOrCreateCA: %v", err)
	}
	return newESTEnv(tb, estOptions{ca: ca}), root
}

// clientCert makes a 30-day client certificate for cn and key, signed by
// parent, or self-signed when parent is nil.
func clientCert(tb testing.TB, parent *testCert, key crypto.Signer, cn string) *x509.Certificate {
	tb.Helper()
	serial, err := randomSerial()
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	issuer, signer := tmpl, key
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	return createCert(tb, tmpl, issuer, key.Public(), signer)
}

// renewVias are the three ways to renew: /v1/renew with the certificate in
// the TLS handshake, /v1/renew with a JSON proof signed by its key, and EST
// simplereenroll. Each asks for a new key.
var renewVias = []struct {
	name  string
	renew func(tb testing.TB, e *estEnv, leaf *x509.Certificate, key crypto.Signer) estReply
}{
	{"v1 mTLS", func(tb testing.TB, e *estEnv, leaf *x509.Certificate, key crypto.Signer) estReply {
		return e.do(tb, e.client(tb, tlsCert(leaf, key)), http.MethodPost, "/v1/renew",
			map[string]string{"Content-Type": "application/pkcs10"}, estCSR(tb, genP256(tb), ""))
	}},
	{"v1 proof", func(tb testing.TB, e *estEnv, leaf *x509.Certificate, key crypto.Signer) estReply {
		return e.do(tb, e.client(tb, nil), http.MethodPost, "/v1/renew",
			map[string]string{"Content-Type": "application/json"}, proofBody(tb, leaf, key, estCSR(tb, genP256(tb), "")))
	}},
	{"EST", func(tb testing.TB, e *estEnv, leaf *x509.Certificate, key crypto.Signer) estReply {
		// RFC 7030 wants the subject of the certificate in the CSR.
		return e.do(tb, e.client(tb, tlsCert(leaf, key)), http.MethodPost, "/.well-known/est/simplereenroll",
			map[string]string{"Content-Type": "application/pkcs10"}, estBase64Body(estCSR(tb, genP256(tb), leaf.Subject.CommonName)))
	}},
}

// apiError returns the code and message of an error answer, JSON or EST
// plain text.
func apiError(tb testing.TB, rep estReply) (Code, string) {
	tb.Helper()
	if rep.header.Get("Content-Type") == "application/json" {
		var body struct{ Code, Message string }
		if err := json.Unmarshal(rep.body, &body); err != nil {
			tb.Fatalf("error answer is not JSON: %v: %q", err, rep.body)
		}
		return Code(body.Code), body.Message
	}
	code, msg, ok := strings.Cut(strings.TrimSuffix(string(rep.body), "\n"), ": ")
	if !ok {
		tb.Fatalf("error answer is not '<code>: <message>': %q", rep.body)
	}
	return Code(code), msg
}

// newAudit runs do and returns the audit events it added.
func newAudit(tb testing.TB, e *estEnv, do func()) []store.AuditEvent {
	tb.Helper()
	ctx := context.Background()
	before, err := e.db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		tb.Fatal(err)
	}
	do()
	after, err := e.db.Audit(ctx, store.AuditFilter{})
	if err != nil {
		tb.Fatal(err)
	}
	if len(after) < len(before) {
		tb.Fatalf("audit shrank from %d to %d events", len(before), len(after))
	}
	return after[len(before):]
}

// wantFailAudit checks that evs is the one audit record of a refusal.
func wantFailAudit(tb testing.TB, evs []store.AuditEvent, action string, code Code, device, tokenID string) {
	tb.Helper()
	if len(evs) != 1 {
		tb.Fatalf("%d audit events, want one %s: %+v", len(evs), action, evs)
	}
	ev := evs[0]
	if ev.Action != action || ev.Detail != string(code) || ev.DeviceID != device || ev.TokenID != tokenID || ev.Remote != "127.0.0.1" {
		tb.Errorf("audit event %+v, want %s %s for device %q, token %q, from 127.0.0.1", ev, action, code, device, tokenID)
	}
}

// TestRenewFailureAudit: a failed renewal names a device in its audit
// record only if the certificate verifies as the CA's and its CN is a
// device id. A forged certificate could otherwise file records of any size
// and content under any real device's name.
func TestRenewFailureAudit(t *testing.T) {
	e, root := newOperatorCAEnv(t)
	ctx := context.Background()
	// pi-0100 is a real device: the name a forger would borrow.
	e.enroll(t, e.mintToken(t, "pi-0100", 1), genP256(t), "pi-0100")
	goneKey := genP256(t)
	gone := e.enroll(t, e.mintToken(t, "pi-gone", 1), goneKey, "pi-gone")
	if _, err := e.db.RevokeDevice(ctx, "pi-gone", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	k1, k2, k3, k4 := genP256(t), genP256(t), genP256(t), genP256(t)
	// Self-signed, a 30,000-character CN would be there twice, as subject
	// and issuer, and the JSON proof over the body limit.
	forger := newRoot(t, genP256(t), time.Now(), nil)
	cases := []struct {
		name   string
		leaf   *x509.Certificate
		key    crypto.Signer
		status int
		code   Code
		device string // of the audit record
	}{
		{"self-signed, a real device's id", clientCert(t, nil, k1, "pi-0100"), k1, 401, CodeCertInvalid, ""},
		{"self-signed, terminal escapes and a newline", clientCert(t, nil, k2, "\x1b[2J\x1b[31mpi-0100\x1b[0m\nforged"), k2, 401, CodeCertInvalid, ""},
		{"another CA's, 30,000 characters", clientCert(t, &forger, k3, strings.Repeat("p", 30_000)), k3, 401, CodeCertInvalid, ""},
		{"the CA's, revoked", gone, goneKey, 403, CodeDeviceRevoked, "pi-gone"},
		// Verified, but the CA issued it outside the enrollment API: its
		// CN is no device id and the store has no record of it.
		{"the CA's, CN no device id", clientCert(t, &root, k4, "Ops Team\n"), k4, 401, CodeCertInvalid, ""},
	}
	for _, via := range renewVias {
		for _, tc := range cases {
			t.Run(via.name+"/"+tc.name, func(t *testing.T) {
				var rep estReply
				evs := newAudit(t, e, func() { rep = via.renew(t, e, tc.leaf, tc.key) })
				if code, msg := apiError(t, rep); rep.status != tc.status || code != tc.code {
					t.Fatalf("answer %d %s (%s), want %d %s", rep.status, code, msg, tc.status, tc.code)
				}
				wantFailAudit(t, evs, store.ActRenewFail, tc.code, tc.device, "")
			})
		}
	}
	evs, err := e.db.Audit(ctx, store.AuditFilter{DeviceID: "pi-0100"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range evs {
		if ev.Action == store.ActRenewFail {
			t.Errorf("a forged certificate filed %+v under pi-0100", ev)
		}
	}
}

// TestRenewExpiredBeyondGrace: a certificate of the CA that expired beyond
// the grace is told that it is revoked when it is, and otherwise how to
// come back (a re-provisioning token, as device-agent advises). One that is
// not the CA's is invalid, whatever its dates.
func TestRenewExpiredBeyondGrace(t *testing.T) {
	e, root := newOperatorCAEnv(t)
	ctx := context.Background()
	idleKey, revokedKey, droppedKey, forgedKey := genP256(t), genP256(t), genP256(t), genP256(t)
	idle := e.enroll(t, e.mintToken(t, "pi-idle", 1), idleKey, "pi-idle")
	revoked := e.enroll(t, e.mintToken(t, "pi-revoked", 1), revokedKey, "pi-revoked")
	e.enroll(t, e.mintToken(t, "pi-dropped", 1), genP256(t), "pi-dropped")
	for _, id := range []string{"pi-revoked", "pi-dropped"} {
		if _, err := e.db.RevokeDevice(ctx, id, "test", time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	// The CA's, for a revoked device, but not on record (it was issued
	// while a restored store was lost, say): the device decides.
	dropped := clientCert(t, &root, droppedKey, "pi-dropped")
	forged := clientCert(t, nil, forgedKey, "pi-idle")
	e.clock.Set(time.Until(idle.NotAfter) + 8*24*time.Hour) // the grace is 7 days

	cases := []struct {
		name   string
		leaf   *x509.Certificate
		key    crypto.Signer
		status int
		code   Code
		device string // of the audit record
		advice string // in the message
	}{
		{"not revoked", idle, idleKey, 401, CodeCertExpired, "pi-idle", "fleetmq token create --device pi-idle --reprovision"},
		{"revoked", revoked, revokedKey, 403, CodeDeviceRevoked, "pi-revoked", ""},
		{"device revoked, certificate not on record", dropped, droppedKey, 403, CodeDeviceRevoked, "pi-dropped", ""},
		{"not the CA's", forged, forgedKey, 401, CodeCertInvalid, "", ""},
	}
	for _, via := range renewVias {
		for _, tc := range cases {
			t.Run(via.name+"/"+tc.name, func(t *testing.T) {
				before := e.snapshot(t)
				var rep estReply
				evs := newAudit(t, e, func() { rep = via.renew(t, e, tc.leaf, tc.key) })
				code, msg := apiError(t, rep)
				if rep.status != tc.status || code != tc.code {
					t.Fatalf("answer %d %s (%s), want %d %s", rep.status, code, msg, tc.status, tc.code)
				}
				if !strings.Contains(msg, tc.advice) {
					t.Errorf("message %q does not say %q", msg, tc.advice)
				}
				wantFailAudit(t, evs, store.ActRenewFail, tc.code, tc.device, "")
				if after := e.snapshot(t); before != after {
					t.Error("refused renewal changed the store")
				}
			})
		}
	}
}

// TestRenewWithoutGrace: with NoRenewGrace an expired certificate never
// renews, and is told so without a grace period in the message.
func TestRenewWithoutGrace(t *testing.T) {
	e := newESTEnv(t, estOptions{mutate: func(c *Config) { c.RenewGrace = NoRenewGrace }})
	key := genP256(t)
	leaf := e.enroll(t, e.mintToken(t, "pi-ng", 1), key, "pi-ng")
	e.clock.Set(time.Until(leaf.NotAfter) + time.Minute)
	for _, via := range renewVias {
		rep := via.renew(t, e, leaf, key)
		code, msg := apiError(t, rep)
		if rep.status != 401 || code != CodeCertExpired || !strings.HasPrefix(msg, "certificate expired; enroll again") {
			t.Errorf("%s: answer %d %s (%s), want 401 cert_expired", via.name, rep.status, code, msg)
		}
	}
	if _, err := NewHandler(Config{CA: e.ca, RenewGrace: -time.Hour}, e.db); err == nil {
		t.Error("a negative grace other than NoRenewGrace was accepted")
	}
}

// TestEnrollFailureAudit: a failed enrollment names the device its token is
// bound to (the store says so), never the id a CSR asks for.
func TestEnrollFailureAudit(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	e.enroll(t, e.mintToken(t, "pi-0001", 1), genP256(t), "pi-0001")
	usedSecret := e.mintToken(t, "pi-0002", 1)
	e.enroll(t, usedSecret, genP256(t), "pi-0002")
	boundSecret := e.mintToken(t, "pi-0003", 5)
	freeSecret := e.mintToken(t, "", 5)
	tokenID := func(secret string) string {
		t.Helper()
		tok, err := ParseToken(secret)
		if err != nil {
			t.Fatal(err)
		}
		return TokenID(tok.Hash)
	}
	key := genP256(t)
	cases := []struct {
		name   string
		secret string
		csr    []byte // DER
		code   Code
		device string // of the audit record
		say    string // in the message
	}{
		{"used token bound to a device", usedSecret, estCSR(t, key, "pi-0002"), CodeTokenUsed, "pi-0002", ""},
		// The holder is told the id the token enrolls.
		{"bound token, CSR for another id", boundSecret, estCSR(t, key, "pi-0001"), CodeIDMismatch, "pi-0003", "bound to another device id: pi-0003"},
		{"bound token, broken CSR", boundSecret, []byte("0\x03\x02\x01\x00"), CodeCSRInvalid, "pi-0003", ""},
		{"free token, CSR for a taken id", freeSecret, estCSR(t, key, "pi-0001"), CodeIDTaken, "", ""},
	}
	for _, tc := range cases {
		for _, via := range []string{"v1", "EST"} {
			t.Run(via+"/"+tc.name, func(t *testing.T) {
				var rep estReply
				evs := newAudit(t, e, func() {
					if via == "v1" {
						rep = e.do(t, e.client(t, nil), http.MethodPost, "/v1/enroll",
							map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + tc.secret}, tc.csr)
					} else {
						rep = e.do(t, e.client(t, nil), http.MethodPost, "/.well-known/est/simpleenroll",
							map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth("", tc.secret)}, estBase64Body(tc.csr))
					}
				})
				if code, msg := apiError(t, rep); code != tc.code || !strings.Contains(msg, tc.say) {
					t.Fatalf("answer %d %s (%s), want %s (%s)", rep.status, code, msg, tc.code, tc.say)
				}
				wantFailAudit(t, evs, store.ActTokenFail, tc.code, tc.device, tokenID(tc.secret))
			})
		}
	}
	// What `fleetmq audit --device pi-0003` shows.
	evs, err := e.db.Audit(context.Background(), store.AuditFilter{DeviceID: "pi-0003"})
	if err != nil {
		t.Fatal(err)
	}
	fails := 0
	for _, ev := range evs {
		if ev.Action == store.ActTokenFail {
			fails++
		}
	}
	if fails != 4 {
		t.Errorf("pi-0003 has %d %s audit events, want the 4 failed attempts with its token", fails, store.ActTokenFail)
	}
}

// TestRemoteAddrCleaned: the remote address goes into audit records and
// log lines; whatever a wrapping handler set it to, it stays one short line.
func TestRemoteAddrCleaned(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	cases := []struct {
		remote, want string
	}{
		{"192.0.2.7:4242", "192.0.2.7"},
		{"[2001:db8::1]:4242", "2001:db8::1"},
		{"10.0.0.1\r\nforged audit line", "10.0.0.1??forged audit line"},
		{"\x1b[2J" + strings.Repeat("a", 30_000) + ":1", "?[2J" + strings.Repeat("a", maxRemoteLen-4)},
	}
	for _, tc := range cases {
		req := httptest.NewRequest(http.MethodPost, "/v1/enroll", strings.NewReader("x"))
		req.RemoteAddr = tc.remote
		req.Header.Set("Authorization", "Bearer nope")
		var rec *httptest.ResponseRecorder
		evs := newAudit(t, e, func() {
			rec = httptest.NewRecorder()
			e.srv.Config.Handler.ServeHTTP(rec, req)
		})
		if rec.Code != http.StatusUnauthorized || len(evs) != 1 {
			t.Fatalf("remote %.40q: answer %d, %d audit events", tc.remote, rec.Code, len(evs))
		}
		if evs[0].Remote != tc.want {
			t.Errorf("remote %.40q recorded as %.80q, want %.80q", tc.remote, evs[0].Remote, tc.want)
		}
	}
}

// TestSeveralCNsRefused: a CSR subject with more than one CN is refused
// before any rule reads "the" CN, whichever the parser would keep.
func TestSeveralCNsRefused(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	key := genP256(t)
	cert := e.enroll(t, e.mintToken(t, "pi-0009", 1), key, "pi-0009")
	bound := e.mintToken(t, "pi-0010", 1)
	free := e.mintToken(t, "", 1)
	twoCNs := severalCNsCSR(t, genP256(t), "zz-evil", "pi-0010")
	cases := []struct {
		name   string
		client *http.Client
		path   string
		hdr    map[string]string
		body   []byte
	}{
		{"v1 enroll, bound token", e.client(t, nil), "/v1/enroll",
			map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + bound}, twoCNs},
		{"v1 enroll, free token", e.client(t, nil), "/v1/enroll",
			map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + free}, severalCNsCSR(t, genP256(t), "zz-evil", "pi-0011")},
		{"v1 renew", e.client(t, tlsCert(cert, key)), "/v1/renew",
			map[string]string{"Content-Type": "application/pkcs10"}, severalCNsCSR(t, genP256(t), "zz-evil", "pi-0009")},
		{"EST enroll, bound token", e.client(t, nil), "/.well-known/est/simpleenroll",
			map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth("", bound)}, estBase64Body(twoCNs)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot(t)
			rep := e.do(t, tc.client, http.MethodPost, tc.path, tc.hdr, tc.body)
			if code, msg := apiError(t, rep); rep.status != 400 || code != CodeCSRInvalid || !strings.Contains(msg, "2 CommonName") {
				t.Errorf("answer %d %s (%s), want 400 %s", rep.status, code, msg, CodeCSRInvalid)
			}
			if after := e.snapshot(t); before != after {
				t.Error("refused request changed the store")
			}
		})
	}
}

// severalCNsCSR returns a DER CSR whose subject has one CN attribute per
// name, in order, as openssl req -subj /CN=a/CN=b writes it.
func severalCNsCSR(tb testing.TB, key crypto.Signer, cns ...string) []byte {
	tb.Helper()
	var rdns pkix.RDNSequence
	for _, cn := range cns {
		rdns = append(rdns, pkix.RelativeDistinguishedNameSET{{Type: oidCommonName, Value: cn}})
	}
	raw, err := asn1.Marshal(rdns)
	if err != nil {
		tb.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{RawSubject: raw}, key)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// TestCSRsFromOpenSSL: what QA made with openssl is refused with the code
// that says what is wrong. RSA-PSS is signed by OpenSSL 3 with the longest
// salt by default, which x509 cannot verify: the refusal says how to sign
// instead of calling the signature wrong.
func TestCSRsFromOpenSSL(t *testing.T) {
	requireTools(t, "openssl")
	dir := t.TempDir()
	ec := func(curve string) []string {
		return []string{"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:" + curve}
	}
	pss := []string{"-newkey", "rsa:2048", "-sigopt", "rsa_padding_mode:pss"}
	cases := []struct {
		name, subject string
		args          []string
		code          Code
		msg           string
	}{
		{"two CNs", "/CN=zz-evil/CN=pi-0009", ec("P-256"), CodeCSRInvalid, "2 CommonName"},
		{"secp256k1", "/CN=pi-0009", ec("secp256k1"), CodeKeyUnsupported, "curve secp256k1 is not supported"},
		{"brainpoolP256r1", "/CN=pi-0009", ec("brainpoolP256r1"), CodeKeyUnsupported, "curve brainpoolP256r1 is not supported"},
		{"P-256", "/CN=pi-0009", ec("P-256"), "", ""},
		{"P-256 with SHA-1", "/CN=pi-0009", append(ec("P-256"), "-sha1"), CodeCSRInvalid, "signed with SHA-1"},
		{"RSA with MD5", "/CN=pi-0009", []string{"-newkey", "rsa:2048", "-md5"}, CodeCSRInvalid, "signed with MD5"},
		{"PSS salt as long as the hash", "/CN=pi-0009", append(pss, "-sigopt", "rsa_pss_saltlen:digest"), "", ""},
		{"PSS default salt", "/CN=pi-0009", pss, CodeCSRInvalid, "rsa_pss_saltlen:digest"},
		{"RSASSA-PSS key", "/CN=pi-0009", []string{"-newkey", "rsa-pss", "-pkeyopt", "rsa_keygen_bits:2048"}, CodeKeyUnsupported, "RSASSA-PSS key"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, tc.name+".csr")
			runTool(t, dir, "openssl", append([]string{"req", "-new", "-nodes",
				"-keyout", filepath.Join(dir, tc.name+".key"), "-subj", tc.subject, "-out", out}, tc.args...)...)
			data, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			_, err = ParseCSR(data)
			if tc.code == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			wantCode(t, err, tc.code)
			if e := AsError(err); !strings.Contains(e.Message, tc.msg) {
				t.Errorf("message %q does not say %q", e.Message, tc.msg)
			}
		})
	}
}

// TestMethodNotAllowed: a 405 says which methods the path has (RFC 9110
// section 15.5.6); a 404 has no Allow.
func TestMethodNotAllowed(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	c := e.client(t, nil)
	cases := []struct {
		method, path string
		status       int
		allow        string
	}{
		{"GET", "/v1/enroll", 405, "POST"},
		{"PUT", "/v1/renew", 405, "POST"},
		{"DELETE", "/v1/ca", 405, "GET, HEAD"},
		{"POST", "/v1/crl", 405, "GET, HEAD"},
		{"GET", "/.well-known/est/simpleenroll", 405, "POST"},
		{"POST", "/.well-known/est/factory-a/cacerts", 405, "GET, HEAD"},
		{"GET", "/v1/nothing", 404, ""},
	}
	for _, tc := range cases {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			rep := e.do(t, c, tc.method, tc.path, nil, nil)
			if rep.status != tc.status {
				t.Fatalf("status %d, want %d", rep.status, tc.status)
			}
			if got, ok := rep.header["Allow"]; tc.allow == "" && ok || tc.allow != "" && (len(got) != 1 || got[0] != tc.allow) {
				t.Errorf("Allow %q, want %q", got, tc.allow)
			}
		})
	}
}

// TestStrictTransportSecurity: every answer of the HTTPS listener, /v1, EST
// and errors alike, tells browsers to come back over HTTPS only, for this
// host only (no includeSubDomains).
func TestStrictTransportSecurity(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	c := e.client(t, nil)
	key := genP256(t)
	cur := e.enroll(t, e.mintToken(t, "pi-1", 1), key, "pi-1")
	pkcs10 := map[string]string{"Content-Type": "application/pkcs10"}
	cases := []struct {
		name, method, path string
		client             *http.Client
		hdr                map[string]string
		body               []byte
		status             int
	}{
		{"CA", "GET", "/v1/ca", c, nil, nil, 200},
		{"CA, HEAD", "HEAD", "/v1/ca", c, nil, nil, 200},
		{"CRL", "GET", "/v1/crl", c, nil, nil, 200},
		{"enroll", "POST", "/v1/enroll", c, map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + e.mintToken(t, "pi-2", 1)},
			estCSR(t, genP256(t), "pi-2"), 201},
		{"enroll without a token", "POST", "/v1/enroll", c, pkcs10, estCSR(t, genP256(t), "pi-3"), 401},
		{"renew", "POST", "/v1/renew", e.client(t, tlsCert(cur, key)), pkcs10, estCSR(t, genP256(t), ""), 200},
		{"bad CSR", "POST", "/v1/renew", e.client(t, tlsCert(cur, key)), pkcs10, []byte("x"), 400},
		{"EST cacerts", "GET", "/.well-known/est/cacerts", c, nil, nil, 200},
		{"EST csrattrs", "GET", "/.well-known/est/csrattrs", c, nil, nil, 200},
		{"EST simpleenroll without credentials", "POST", "/.well-known/est/simpleenroll", c, pkcs10, estBase64Body(estCSR(t, genP256(t), "pi-4")), 401},
		{"unknown path", "GET", "/nothing", c, nil, nil, 404},
		{"path with dot segments", "GET", "/v1/../v1/ca", c, nil, nil, 404},
		{"method not allowed", "GET", "/v1/enroll", c, nil, nil, 405},
		{"header too large", "GET", "/v1/ca", c, map[string]string{"X-Big": strings.Repeat("a", maxHeaderValue+1)}, nil, 431},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rep := e.do(t, tc.client, tc.method, tc.path, tc.hdr, tc.body)
			if rep.status != tc.status {
				t.Errorf("status %d, want %d: %s", rep.status, tc.status, rep.body)
			}
			if got := rep.header.Values("Strict-Transport-Security"); len(got) != 1 || got[0] != "max-age=31536000" {
				t.Errorf("Strict-Transport-Security %q, want one max-age=31536000", got)
			}
		})
	}
	// Never over plain HTTP (RFC 6797 section 7.2), which only a test can
	// speak to the handler.
	h, err := NewHandler(Config{CA: e.ca}, e.db)
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://fleet.example/v1/ca", nil))
	if got := rec.Header().Values("Strict-Transport-Security"); rec.Code != 200 || len(got) != 0 {
		t.Errorf("over plain HTTP: %d, Strict-Transport-Security %q", rec.Code, got)
	}
}

// TestJSONAnswersNotHTMLEscaped: the JSON answers are read by people and
// scripts, not browsers; <token> stays <token>.
func TestJSONAnswersNotHTMLEscaped(t *testing.T) {
	e := newESTEnv(t, estOptions{})
	rep := e.do(t, e.client(t, nil), http.MethodPost, "/v1/enroll", map[string]string{"Content-Type": "application/pkcs10"}, []byte("x"))
	if rep.status != http.StatusUnauthorized || !strings.Contains(string(rep.body), "'Authorization: Bearer <token>'") {
		t.Errorf("answer %d %s, want the message with <token> as is", rep.status, rep.body)
	}
}

// TestRenewProofJSONErrors: a refused renewal proof says what is wrong
// with it, in a message of bounded size.
func TestRenewProofJSONErrors(t *testing.T) {
	cases := []struct {
		name, body, msg string
	}{
		{"unknown field", `{"csr":"","certificate":"","signature":"","x":1}`, `renewal proof has an unknown field "x"; its fields are csr, certificate, signature`},
		{"unknown field after a field in upper case", `{"CSR":"","admin":true}`, `unknown field "admin"`},
		{"unknown field with escapes, long", `{"\u001b[2J` + strings.Repeat("y", 5000) + `":1}`, `unknown field "?[2J` + strings.Repeat("y", 60) + `"`},
		{"number for a string", `{"csr":1}`, `renewal proof field "csr" must be a string`},
		{"array", `[]`, "renewal proof must be a JSON object with the fields csr, certificate, signature"},
		{"truncated", `{"csr":`, "renewal proof is not valid JSON (it ends too early)"},
		{"syntax error", `{"csr" 1}`, "renewal proof is not valid JSON (at byte "},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := parseProof([]byte(tc.body))
			wantCode(t, err, CodeBadRequest)
			if msg := AsError(err).Message; !strings.Contains(msg, tc.msg) || len(msg) > 200 {
				t.Errorf("message %q, want one with %q", msg, tc.msg)
			}
		})
	}
	// And the client gets it.
	e := newESTEnv(t, estOptions{})
	rep := e.do(t, e.client(t, nil), http.MethodPost, "/v1/renew", map[string]string{"Content-Type": "application/json"}, []byte(cases[0].body))
	if code, msg := apiError(t, rep); rep.status != 400 || code != CodeBadRequest || msg != cases[0].msg {
		t.Errorf("answer %d %s %q, want 400 %s %q", rep.status, code, msg, CodeBadRequest, cases[0].msg)
	}
}

// TestBodyReadTimeout: a body that has not arrived when the server's read
// timeout runs out is answered, with a message that says so, as long as the
// write timeout is the longer one (broker/server sets them so).
func TestBodyReadTimeout(t *testing.T) {
	const readTimeout = time.Second
	e := newESTEnv(t, estOptions{server: func(s *http.Server) {
		s.ReadTimeout = readTimeout
		s.WriteTimeout = readTimeout + 10*time.Second
	}})
	for _, path := range []string{"/v1/enroll", "/.well-known/est/simpleenroll"} {
		t.Run(path, func(t *testing.T) {
			token := e.mintToken(t, "", 1)
			conn, err := tls.Dial("tcp", e.srv.Listener.Addr().String(), &tls.Config{RootCAs: e.ca.Pool(), ServerName: "127.0.0.1"})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(readTimeout + 20*time.Second))
			// Headers and the first bytes of a body that never ends.
			head := "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token +
				"\r\nContent-Type: application/pkcs10\r\nContent-Length: 1000\r\n\r\nMIIB"
			if _, err := io.WriteString(conn, head); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("no answer after the read timeout: %v", err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			rep := estReply{status: resp.StatusCode, header: resp.Header, body: b}
			if code, msg := apiError(t, rep); rep.status != 400 || code != CodeBadRequest || !strings.Contains(msg, "read timeout") {
				t.Errorf("answer %d %s %q, want 400 %s saying the read timeout ran out", rep.status, code, msg, CodeBadRequest)
			}
		})
	}
}

// TestRestoredAdoptsCertOfYoungCA: on a restored store, a certificate issued
// while the store was lost is adopted by its renewal, also when the CA was
// younger than the backdate at the time: its NotBefore is then the CA's
// start and tells the issue time only to within the backdate.
func TestRestoredAdoptsCertOfYoungCA(t *testing.T) {
	start := time.Now().Truncate(time.Second).Add(-time.Minute)
	root := newRoot(t, genP256(t), time.Now(), func(c *x509.Certificate) { c.NotBefore = start })
	ca, err := LoadOrCreateCA(writeOperatorCA(t, certsPEM(root.cert), keyPEM(t, root.key, "pkcs8"), 0o600))
	if err != nil {
		t.Fatalf("LoadOrCreateCA: %v", err)
	}
	// The snapshot was taken just after the CA was made; the copy was
	// first served a little later. The lost certificate is issued below,
	// in between as far as its dates tell.
	e := newESTEnv(t, estOptions{ca: ca, mutate: func(c *Config) {
		c.RestoredFrom = start.Add(10 * time.Second)
		c.RestoredAt = time.Now().Add(time.Minute)
	}})
	e.enroll(t, e.mintToken(t, "pi-lost", 1), genP256(t), "pi-lost")
	key := genP256(t)
	lost, err := ca.IssueDevice(key.Public(), "pi-lost", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !lost.NotBefore.Equal(start) {
		t.Fatalf("NotBefore = %s, want the CA's start %s", lost.NotBefore, start)
	}
	var rep estReply
	evs := newAudit(t, e, func() { rep = renewVias[0].renew(t, e, lost, key) })
	if rep.status != http.StatusOK {
		code, msg := apiError(t, rep)
		t.Fatalf("renewal with the lost certificate: answer %d %s (%s), want 200", rep.status, code, msg)
	}
	if len(evs) == 0 || evs[0].Action != store.ActCertAdopt || evs[0].Serial != SerialHex(lost.SerialNumber) {
		t.Fatalf("audit %+v, want the lost certificate adopted first", evs)
	}
	rec, err := e.db.Cert(context.Background(), SerialHex(lost.SerialNumber))
	if err != nil {
		t.Fatal(err)
	}
	if rec.IssuedAt.Before(start) || rec.IssuedAt.After(time.Now()) {
		t.Errorf("adopted record IssuedAt = %s, want between the CA's start %s and now", rec.IssuedAt, start)
	}
}

// TestFailureLimitHoldsForHeldBodies: requests that all passed the limiter
// on arrival, their bodies held back, are charged as they fail: no more
// fail, and are audited, than the burst allows. A client needs no
// credentials to fail a renewal, so a check on arrival alone would let one
// address write a failure record for every connection it can hold open.
func TestFailureLimitHoldsForHeldBodies(t *testing.T) {
	const burst, held = 3, 8
	e := newESTEnv(t, estOptions{mutate: func(c *Config) {
		c.FailureBurst = burst
		c.FailureRate = 0.001 // no refill while the test runs
	}})
	type conn struct {
		c  *tls.Conn
		br *bufio.Reader
	}
	conns := make([]conn, held)
	for i := range conns {
		c := e.dialRaw(t)
		head := "POST /v1/renew HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/pkcs10\r\n" +
			"Content-Length: 1\r\nExpect: 100-continue\r\n\r\n"
		if _, err := io.WriteString(c, head); err != nil {
			t.Fatal(err)
		}
		conns[i] = conn{c, bufio.NewReader(c)}
	}
	// net/http sends 100 Continue when the handler starts reading the
	// body: every request is then past the check on arrival.
	for i, c := range conns {
		resp, err := http.ReadResponse(c.br, nil)
		if err != nil || resp.StatusCode != http.StatusContinue {
			t.Fatalf("request %d: want 100 Continue, got %v %v", i, resp, err)
		}
	}
	statuses := map[int]int{}
	evs := newAudit(t, e, func() {
		for _, c := range conns {
			if _, err := io.WriteString(c.c, "x"); err != nil {
				t.Fatal(err)
			}
		}
		for i, c := range conns {
			resp, err := http.ReadResponse(c.br, nil)
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			statuses[resp.StatusCode]++
		}
	})
	if statuses[http.StatusUnauthorized] != burst || statuses[http.StatusTooManyRequests] != held-burst {
		t.Errorf("answers %v, want %d × 401 cert_required and %d × 429", statuses, burst, held-burst)
	}
	if len(evs) != burst {
		t.Errorf("%d audit events, want %d (the burst): %+v", len(evs), burst, evs)
	}
}

// TestBrokerURLFromHost: the default broker URL names the host the device
// used, whatever form its Host header takes, and one a device can parse.
// A client leaves the port out of Host when it used its scheme's default
// (an enrollment server on 443), and HTTP/1.0 may send no Host at all.
func TestBrokerURLFromHost(t *testing.T) {
	e := newESTEnv(t, estOptions{mutate: func(c *Config) { c.MQTTPort = 8883 }})
	for i, tc := range []struct {
		proto, host string // host "" sends no Host header
		want        string
	}{
		{"HTTP/1.1", "pi-gateway.local:8443", "mqtts://pi-gateway.local:8883"},
		{"HTTP/1.1", "pi-gateway.local", "mqtts://pi-gateway.local:8883"},
		{"HTTP/1.1", "192.0.2.7", "mqtts://192.0.2.7:8883"},
		{"HTTP/1.1", "[2001:db8::7]:8443", "mqtts://[2001:db8::7]:8883"},
		{"HTTP/1.1", "[2001:db8::7]", "mqtts://[2001:db8::7]:8883"},
		{"HTTP/1.0", "", "mqtts://127.0.0.1:8883"}, // the address it dialed
	} {
		t.Run(tc.proto+" "+tc.host, func(t *testing.T) {
			token := e.mintToken(t, "pi-"+strconv.Itoa(i), 1)
			csr := csrPEM(estCSR(t, genP256(t), ""), "CERTIFICATE REQUEST")
			conn := e.dialRaw(t)
			head := "POST /v1/enroll " + tc.proto + "\r\n"
			if tc.host != "" {
				head += "Host: " + tc.host + "\r\n"
			}
			head += "Authorization: Bearer " + token + "\r\nContent-Type: application/pkcs10\r\n" +
				"Content-Length: " + strconv.Itoa(len(csr)) + "\r\n\r\n"
			if _, err := io.WriteString(conn, head+string(csr)); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got Response
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != http.StatusCreated {
				t.Fatalf("status %d, decode %v", resp.StatusCode, err)
			}
			if got.BrokerURL != tc.want {
				t.Errorf("broker_url %q, want %q", got.BrokerURL, tc.want)
			}
			if u, err := url.Parse(got.BrokerURL); err != nil || u.Port() != "8883" {
				t.Errorf("broker_url %q does not parse as a URL with a port: %v", got.BrokerURL, err)
			}
		})
	}
}

// dialRaw opens a TLS connection to the server for a hand-written request,
// closed when the test ends.
func (e *estEnv) dialRaw(tb testing.TB) *tls.Conn {
	tb.Helper()
	c, err := tls.Dial("tcp", e.srv.Listener.Addr().String(), &tls.Config{RootCAs: e.ca.Pool(), ServerName: "127.0.0.1"})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

// TestCAUnusableIsUnavailable: while the CA cannot issue — its chain has
// ended, or the clock went back before it starts — enrollment and renewal
// (v1 and EST) answer 503 unavailable, saying what the operator must do,
// and change nothing: the operator's to fix, not a server bug (500).
func TestCAUnusableIsUnavailable(t *testing.T) {
	clock := &offsetClock{}
	ca, err := LoadOrCreateCA(CAConfig{Dir: filepath.Join(t.TempDir(), "ca"), Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	e := newESTEnv(t, estOptions{ca: ca, clock: clock})
	end := ca.ChainEnd()
	// Enrolled an hour before the end, its certificate ends with the CA and
	// may renew within the grace after.
	clock.Set(time.Until(end) - time.Hour)
	key := genP256(t)
	leaf := e.enroll(t, e.mintToken(t, "pi-late", 1), key, "pi-late")

	want503 := func(t *testing.T, rep estReply, advice string) {
		t.Helper()
		code, msg := apiError(t, rep)
		if rep.status != http.StatusServiceUnavailable || code != CodeUnavailable || !strings.Contains(msg, advice) {
			t.Errorf("answer %d %s (%s), want 503 %s saying %q", rep.status, code, msg, CodeUnavailable, advice)
		}
		if ra := rep.header.Get("Retry-After"); ra != strconv.Itoa(unavailableRetry) {
			t.Errorf("Retry-After %q, want %d", ra, unavailableRetry)
		}
	}
	enrollVias := []struct {
		name   string
		enroll func(secret, id string) estReply
	}{
		{"v1 enroll", func(secret, id string) estReply {
			return e.do(t, e.client(t, nil), http.MethodPost, "/v1/enroll",
				map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + secret}, estCSR(t, genP256(t), id))
		}},
		{"EST enroll", func(secret, id string) estReply {
			return e.do(t, e.client(t, nil), http.MethodPost, "/.well-known/est/simpleenroll",
				map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth("", secret)}, estBase64Body(estCSR(t, genP256(t), id)))
		}},
	}
	fresh := 0
	for _, tc := range []struct {
		name   string
		off    time.Duration
		renew  bool // the certificate is within its grace then; not before it starts
		advice string
	}{
		{"CA expired", time.Until(end) + time.Minute, true, "its operator must renew the CA (fleetmq README: Renewing or replacing the CA)"},
		{"clock before the CA", -30 * 24 * time.Hour, false, "its operator must set the clock"},
	} {
		clock.Set(tc.off)
		for _, via := range enrollVias {
			t.Run(tc.name+"/"+via.name, func(t *testing.T) {
				// One id per token: a second usable token for an id is refused.
				fresh++
				id := "pi-new-" + strconv.Itoa(fresh)
				secret := e.mintToken(t, id, 1)
				before := e.snapshot(t)
				want503(t, via.enroll(secret, id), tc.advice)
				if after := e.snapshot(t); before != after {
					t.Error("the refused enrollment changed the store")
				}
			})
		}
		if !tc.renew {
			continue
		}
		for _, via := range renewVias {
			t.Run(tc.name+"/renew "+via.name, func(t *testing.T) {
				before := e.snapshot(t)
				want503(t, via.renew(t, e, leaf, key), tc.advice)
				if after := e.snapshot(t); before != after {
					t.Error("the refused renewal changed the store")
				}
			})
		}
	}
}

// TestFreeTokenRefusedAReservedID: a free token, over /v1 or EST, does not
// enroll an id a usable token is bound to, which that token's device would
// otherwise find taken in the field. The refusal is a 409 that says what
// to do, audited and counted like id_taken; it changes nothing and spends
// no use. The bound token still enrolls its id.
func TestFreeTokenRefusedAReservedID(t *testing.T) {
	var mu sync.Mutex
	var results []string
	e := newESTEnv(t, estOptions{mutate: func(c *Config) {
		c.Observe = func(op, result string) {
			mu.Lock()
			defer mu.Unlock()
			results = append(results, op+":"+result)
		}
	}})
	bound := e.mintToken(t, "pi-7", 1)
	free := e.mintToken(t, "", 1)
	tok, err := ParseToken(free)
	if err != nil {
		t.Fatal(err)
	}
	boundTok, err := ParseToken(bound)
	if err != nil {
		t.Fatal(err)
	}
	key := genP256(t)
	before := e.snapshot(t)
	for _, via := range []string{"v1", "EST"} {
		var rep estReply
		evs := newAudit(t, e, func() {
			if via == "v1" {
				rep = e.do(t, e.client(t, nil), http.MethodPost, "/v1/enroll",
					map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + free}, estCSR(t, key, "pi-7"))
			} else {
				rep = e.do(t, e.client(t, nil), http.MethodPost, "/.well-known/est/simpleenroll",
					map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth("pi-7", free)}, estBase64Body(estCSR(t, key, "pi-7")))
			}
		})
		code, msg := apiError(t, rep)
		if rep.status != http.StatusConflict || code != CodeIDHasToken {
			t.Fatalf("%s: answer %d %s (%s), want 409 %s", via, rep.status, code, msg, CodeIDHasToken)
		}
		for _, say := range []string{"pi-7 is reserved", "another id", "fleetmq token revoke " + TokenID(boundTok.Hash)} {
			if !strings.Contains(msg, say) {
				t.Errorf("%s: message %q does not say %q", via, msg, say)
			}
		}
		wantFailAudit(t, evs, store.ActTokenFail, CodeIDHasToken, "", TokenID(tok.Hash))
		if after := e.snapshot(t); after != before {
			t.Fatalf("%s: the refused enrollment changed the store", via)
		}
	}
	e.enroll(t, bound, genP256(t), "pi-7")
	e.enroll(t, free, genP256(t), "pi-8") // its one use is left
	mu.Lock()
	defer mu.Unlock()
	want := []string{"enroll:id_has_token", "enroll:id_has_token", "enroll:ok", "enroll:ok"}
	if !slices.Equal(results, want) {
		t.Errorf("Observe calls %q, want %q", results, want)
	}
}
