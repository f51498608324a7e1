package enroll

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	_ "crypto/md5" // the hash of a refused CSR signature
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// csrWay is one way a CSR reaches the CA. prepare makes what sending a CSR
// for device id needs (a token, or the device enrolled to renew) and returns
// the sender, which returns the answer and the certificate issued, if any.
type csrWay struct {
	name string
	// free: the CSR's CN names the device (a free token). The others
	// know the id from the token's binding or the current certificate.
	free bool
	// renew: the device exists, and the CSR is for its next certificate.
	renew   bool
	prepare func(tb testing.TB, e *estEnv, anon *http.Client, id string) (send func(der []byte) (estReply, *x509.Certificate))
}

// csrWays are every endpoint that issues a device certificate for a CSR.
var csrWays = []csrWay{
	{name: "v1 enroll", prepare: func(tb testing.TB, e *estEnv, anon *http.Client, id string) func([]byte) (estReply, *x509.Certificate) {
		return v1Enroller(tb, e, anon, e.mintToken(tb, id, 1))
	}},
	{name: "v1 enroll, free token", free: true, prepare: func(tb testing.TB, e *estEnv, anon *http.Client, id string) func([]byte) (estReply, *x509.Certificate) {
		return v1Enroller(tb, e, anon, e.mintToken(tb, "", 1))
	}},
	{name: "EST simpleenroll", prepare: func(tb testing.TB, e *estEnv, anon *http.Client, id string) func([]byte) (estReply, *x509.Certificate) {
		token := e.mintToken(tb, id, 1)
		return func(der []byte) (estReply, *x509.Certificate) {
			rep := e.do(tb, anon, http.MethodPost, "/.well-known/est/simpleenroll",
				map[string]string{"Content-Type": "application/pkcs10", "Authorization": basicAuth("", token)}, estBase64Body(der))
			return rep, estAnswer(tb, rep)
		}
	}},
	{name: "v1 renew", renew: true, prepare: func(tb testing.TB, e *estEnv, anon *http.Client, id string) func([]byte) (estReply, *x509.Certificate) {
		return renewer(tb, e, anon, id, v1Answer, func(c *http.Client, _ *x509.Certificate, _ crypto.Signer, der []byte) estReply {
			return e.do(tb, c, http.MethodPost, "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, der)
		})
	}},
	{name: "v1 renew, proof", renew: true, prepare: func(tb testing.TB, e *estEnv, anon *http.Client, id string) func([]byte) (estReply, *x509.Certificate) {
		return renewer(tb, e, anon, id, v1Answer, func(_ *http.Client, cur *x509.Certificate, key crypto.Signer, der []byte) estReply {
			return e.do(tb, anon, http.MethodPost, "/v1/renew",
				map[string]string{"Content-Type": "application/json"}, proofBody(tb, cur, key, der))
		})
	}},
	{name: "EST simplereenroll", renew: true, prepare: func(tb testing.TB, e *estEnv, anon *http.Client, id string) func([]byte) (estReply, *x509.Certificate) {
		return renewer(tb, e, anon, id, estAnswer, func(c *http.Client, _ *x509.Certificate, _ crypto.Signer, der []byte) estReply {
			return e.do(tb, c, http.MethodPost, "/.well-known/est/simplereenroll",
				map[string]string{"Content-Type": "application/pkcs10"}, estBase64Body(der))
		})
	}},
}

func v1Enroller(tb testing.TB, e *estEnv, anon *http.Client, token string) func([]byte) (estReply, *x509.Certificate) {
	return func(der []byte) (estReply, *x509.Certificate) {
		rep := e.do(tb, anon, http.MethodPost, "/v1/enroll",
			map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer " + token}, der)
		return rep, v1Answer(tb, rep)
	}
}

// renewer enrolls device id and returns the sender of its renewals. request
// sends one, given a client presenting the current certificate, that
// certificate and its key.
func renewer(tb testing.TB, e *estEnv, anon *http.Client, id string, answer func(testing.TB, estReply) *x509.Certificate,
	request func(c *http.Client, cur *x509.Certificate, key crypto.Signer, der []byte) estReply) func([]byte) (estReply, *x509.Certificate) {
	key := genP256(tb)
	rep, cur := v1Enroller(tb, e, anon, e.mintToken(tb, id, 1))(estCSR(tb, key, id))
	if cur == nil {
		tb.Fatalf("enroll %s to renew it: %d %s", id, rep.status, rep.body)
	}
	c := e.client(tb, tlsCert(cur, key))
	return func(der []byte) (estReply, *x509.Certificate) {
		rep := request(c, cur, key, der)
		return rep, answer(tb, rep)
	}
}

// v1Answer returns the certificate of a successful /v1 answer, nil for an
// error answer.
func v1Answer(tb testing.TB, rep estReply) *x509.Certificate {
	tb.Helper()
	if rep.status/100 != 2 {
		return nil
	}
	var resp Response
	if err := json.Unmarshal(rep.body, &resp); err != nil {
		tb.Fatalf("answer is not JSON: %v", err)
	}
	block, _ := pem.Decode([]byte(resp.Certificate))
	if block == nil {
		tb.Fatalf("no certificate in %q", rep.body)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// estAnswer returns the one certificate of a successful EST answer, nil for
// an error answer.
func estAnswer(tb testing.TB, rep estReply) *x509.Certificate {
	tb.Helper()
	if rep.status != http.StatusOK {
		return nil
	}
	certs := parseESTPKCS7(tb, rep.body)
	if len(certs) != 1 {
		tb.Fatalf("answer holds %d certificates, want one", len(certs))
	}
	return certs[0]
}

// fleetAndCerts is the fleet state with the certificate records of ids: a
// refused request must change neither.
func fleetAndCerts(tb testing.TB, e *estEnv, ids ...string) string {
	tb.Helper()
	var b strings.Builder
	b.WriteString(e.snapshot(tb))
	for _, id := range ids {
		certs, err := e.db.DeviceCerts(context.Background(), id)
		if errors.Is(err, store.ErrNotFound) {
			continue // no such device yet
		}
		if err != nil {
			tb.Fatal(err)
		}
		for _, c := range certs {
			fmt.Fprintf(&b, "\n%s %s", id, c.Serial)
		}
	}
	return b.String()
}

// wantDeviceCert checks that c is a device certificate exactly as the CA
// makes it, whatever the CSR asked for: CN id and nothing else in the
// subject, no SANs, not a CA, key usage digital signature and extended key
// usage client auth only, no extensions but those four, pub the key.
func wantDeviceCert(tb testing.TB, ca *CA, c *x509.Certificate, id string, pub crypto.PublicKey) {
	tb.Helper()
	wantSubject, err := asn1.Marshal(pkix.Name{CommonName: id}.ToRDNSequence())
	if err != nil {
		tb.Fatal(err)
	}
	var exts []string
	for _, e := range c.Extensions {
		exts = append(exts, e.Id.String())
	}
	slices.Sort(exts)
	checks := []struct {
		what string
		ok   bool
	}{
		{"subject is CN=" + id + " only", bytes.Equal(c.RawSubject, wantSubject)},
		{"no SANs", len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses)+len(c.URIs) == 0},
		{"only KU, BC, AKID and EKU extensions", slices.Equal(exts, []string{"2.5.29.15", "2.5.29.19", "2.5.29.35", "2.5.29.37"})},
		{"EKU client auth only", slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) && len(c.UnknownExtKeyUsage) == 0},
		{"KU digital signature only", c.KeyUsage == x509.KeyUsageDigitalSignature},
		{"not a CA", c.BasicConstraintsValid && !c.IsCA && c.MaxPathLen <= 0},
		{"no name constraints", len(c.PermittedDNSDomains)+len(c.ExcludedDNSDomains)+len(c.PermittedURIDomains) == 0},
		{"AKID is the CA's SKID", bytes.Equal(c.AuthorityKeyId, ca.Cert().SubjectKeyId)},
		{"issuer is the CA", bytes.Equal(c.RawIssuer, ca.Cert().RawSubject)},
		{"public key is the CSR's", pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(c.PublicKey)},
	}
	for _, ch := range checks {
		if !ch.ok {
			tb.Errorf("issued certificate: %s: not so", ch.what)
		}
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		tb.Errorf("issued certificate does not verify for client auth: %v", err)
	}
}

// wantRefused checks a refusal: code with its status, a message short
// enough not to echo what the client sent, and nothing written. It returns
// the message.
func wantRefused(tb testing.TB, rep estReply, code Code, before, after string) string {
	tb.Helper()
	got, msg := apiError(tb, rep)
	if got != code || rep.status != StatusOf(code) {
		tb.Errorf("answer %d %s (%s), want %d %s", rep.status, got, msg, StatusOf(code), code)
	}
	if len(msg) > 300 {
		tb.Errorf("message of %d bytes echoes the request: %.80q...", len(msg), msg)
	}
	if before != after {
		tb.Errorf("refused request changed the store:\nbefore %s\nafter  %s", before, after)
	}
	return msg
}

// requestedExtensions returns the extensions a certificate made from tmpl
// holds, picked by OID, for a CSR to ask for: encoding them through x509
// keeps them exactly as a CA would read them.
func requestedExtensions(tb testing.TB, tmpl *x509.Certificate, oids ...asn1.ObjectIdentifier) []pkix.Extension {
	tb.Helper()
	key := genP256(tb)
	tmpl.SerialNumber = big.NewInt(1)
	tmpl.NotBefore, tmpl.NotAfter = time.Now(), time.Now().Add(time.Hour)
	c := createCert(tb, tmpl, tmpl, key.Public(), key)
	var exts []pkix.Extension
	for _, oid := range oids {
		i := slices.IndexFunc(c.Extensions, func(e pkix.Extension) bool { return e.Id.Equal(oid) })
		if i < 0 {
			tb.Fatalf("no extension %s in the template certificate", oid)
		}
		exts = append(exts, c.Extensions[i])
	}
	return exts
}

var (
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidNameConstraints  = asn1.ObjectIdentifier{2, 5, 29, 30}
	oidUID              = asn1.ObjectIdentifier{0, 9, 2342, 19200300, 100, 1, 1}
)

// hostileCSR is a CSR that asks for more than a device certificate holds,
// with the outcome of each way in: "" for a certificate exactly as the
// server makes it, else the code of the refusal.
type hostileCSR struct {
	name string
	// csr returns the DER CSR for device id and key; other is an id of
	// another device, which exists.
	csr      func(tb testing.TB, key crypto.Signer, id, other string) []byte
	enroll   Code // /v1/enroll and EST simpleenroll, with a token bound to id
	free     Code // /v1/enroll with a free token: the CN is the id
	renew    Code // /v1/renew, over mTLS and with a JSON proof
	reenroll Code // EST simplereenroll
}

// withTemplate makes a CSR from the template build returns.
func withTemplate(build func(id, other string) *x509.CertificateRequest) func(testing.TB, crypto.Signer, string, string) []byte {
	return func(tb testing.TB, key crypto.Signer, id, other string) []byte {
		tb.Helper()
		der, err := x509.CreateCertificateRequest(rand.Reader, build(id, other), key)
		if err != nil {
			tb.Fatalf("create csr: %v", err)
		}
		return der
	}
}

// withSubject makes a CSR whose subject is rdns, encoded as given.
func withSubject(rdns func(id, other string) pkix.RDNSequence) func(testing.TB, crypto.Signer, string, string) []byte {
	return withTemplate(func(id, other string) *x509.CertificateRequest {
		raw, err := asn1.Marshal(rdns(id, other))
		if err != nil {
			panic(err) // the test's own constant structures
		}
		return &x509.CertificateRequest{RawSubject: raw}
	})
}

// hostileCSRs asks for everything a device must not get. A subject other
// than CN=id is issued as CN=id where the id comes from elsewhere (a bound
// token, the current certificate), except by EST simplereenroll, which
// RFC 7030 section 4.2.2 makes refuse any change of subject or SANs.
func hostileCSRs() []hostileCSR {
	caTmpl := func() *x509.Certificate {
		return &x509.Certificate{
			BasicConstraintsValid: true, IsCA: true, MaxPathLen: 5,
			KeyUsage:            x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
			ExtKeyUsage:         []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageAny, x509.ExtKeyUsageClientAuth},
			PermittedDNSDomains: []string{".evil.example"},
		}
	}
	extensions := func(oids ...asn1.ObjectIdentifier) func(testing.TB, crypto.Signer, string, string) []byte {
		return func(tb testing.TB, key crypto.Signer, id, other string) []byte {
			return withTemplate(func(id, _ string) *x509.CertificateRequest {
				return &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}, ExtraExtensions: requestedExtensions(tb, caTmpl(), oids...)}
			})(tb, key, id, other)
		}
	}
	cn := func(v any) pkix.RelativeDistinguishedNameSET {
		return pkix.RelativeDistinguishedNameSET{{Type: oidCommonName, Value: v}}
	}
	long := strings.Repeat("a", 10_000)
	return []hostileCSR{
		{name: "basicConstraints CA:TRUE", csr: extensions(oidBasicConstraints)},
		{name: "keyUsage certSign cRLSign", csr: extensions(oidKeyUsage)},
		{name: "extKeyUsage serverAuth any", csr: extensions(oidExtKeyUsage)},
		{name: "name constraints", csr: extensions(oidNameConstraints)},
		{name: "all CA extensions, critical", csr: func(tb testing.TB, key crypto.Signer, id, other string) []byte {
			exts := requestedExtensions(tb, caTmpl(), oidBasicConstraints, oidKeyUsage, oidExtKeyUsage, oidNameConstraints)
			for i := range exts {
				exts[i].Critical = true
			}
			// One no one knows, critical: a CA that copied extensions
			// would make a certificate no verifier accepts.
			exts = append(exts, pkix.Extension{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Critical: true, Value: []byte{5, 0}})
			return withTemplate(func(id, _ string) *x509.CertificateRequest {
				return &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}, ExtraExtensions: exts}
			})(tb, key, id, other)
		}},
		{name: "SANs: DNS, IP, URI, email", reenroll: CodeIDMismatch, csr: withTemplate(func(id, other string) *x509.CertificateRequest {
			return &x509.CertificateRequest{
				Subject:        pkix.Name{CommonName: id},
				DNSNames:       []string{"localhost", other, id, "fleet.example.lan"},
				IPAddresses:    []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
				URIs:           []*url.URL{{Scheme: "spiffe", Host: "fleet", Path: "/" + other}},
				EmailAddresses: []string{other + "@fleet.example.lan"},
			}
		})},
		{name: "subject with O, OU, serialNumber, UID", reenroll: CodeIDMismatch, csr: withTemplate(func(id, other string) *x509.CertificateRequest {
			return &x509.CertificateRequest{Subject: pkix.Name{
				CommonName: id, Organization: []string{"fleetmq"}, OrganizationalUnit: []string{"operators"},
				Country: []string{"XX"}, SerialNumber: other,
				ExtraNames: []pkix.AttributeTypeAndValue{{Type: oidUID, Value: other}},
			}}
		})},
		{name: "CN and O in one RDN", reenroll: CodeIDMismatch, csr: withSubject(func(id, _ string) pkix.RDNSequence {
			return pkix.RDNSequence{{{Type: oidCommonName, Value: id}, {Type: asn1.ObjectIdentifier{2, 5, 4, 10}, Value: "fleetmq"}}}
		})},
		{name: "subject of 30,000 bytes", reenroll: CodeIDMismatch, csr: withTemplate(func(id, _ string) *x509.CertificateRequest {
			return &x509.CertificateRequest{Subject: pkix.Name{CommonName: id, OrganizationalUnit: []string{long, long, long}}}
		})},
		{name: "CN of another device", enroll: CodeIDMismatch, free: CodeIDTaken, renew: CodeIDMismatch, reenroll: CodeIDMismatch,
			csr: withTemplate(func(_, other string) *x509.CertificateRequest {
				return &x509.CertificateRequest{Subject: pkix.Name{CommonName: other}}
			})},
		{name: "no subject", free: CodeIDInvalid, reenroll: CodeIDMismatch, csr: withTemplate(func(string, string) *x509.CertificateRequest {
			return &x509.CertificateRequest{}
		})},
		{name: "empty CN", free: CodeIDInvalid, reenroll: CodeIDMismatch, csr: withSubject(func(string, string) pkix.RDNSequence {
			return pkix.RDNSequence{cn("")}
		})},
		{name: "CN that is not a string", free: CodeIDInvalid, reenroll: CodeIDMismatch, csr: withSubject(func(string, string) pkix.RDNSequence {
			return pkix.RDNSequence{cn(7)}
		})},
		{name: "CN with NUL", enroll: CodeIDMismatch, free: CodeIDInvalid, renew: CodeIDMismatch, reenroll: CodeIDMismatch,
			csr: withSubject(func(id, other string) pkix.RDNSequence { return pkix.RDNSequence{cn(id + "\x00" + other)} })},
		{name: "CN of 10,000 bytes", enroll: CodeIDMismatch, free: CodeIDInvalid, renew: CodeIDMismatch, reenroll: CodeIDMismatch,
			csr: withSubject(func(string, string) pkix.RDNSequence { return pkix.RDNSequence{cn(long)} })},
		{name: "openssl req -addext, everything", reenroll: CodeIDMismatch, csr: func(tb testing.TB, _ crypto.Signer, id, other string) []byte {
			requireTools(tb, "openssl")
			dir := tb.TempDir()
			out := filepath.Join(dir, "req.der")
			runTool(tb, dir, "openssl", "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
				"-keyout", filepath.Join(dir, "req.key"), "-subj", "/O=fleetmq/OU=operators/CN="+id, "-outform", "DER", "-out", out,
				"-addext", "basicConstraints=critical,CA:TRUE,pathlen:3",
				"-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
				"-addext", "extendedKeyUsage=serverAuth,clientAuth,codeSigning,anyExtendedKeyUsage",
				"-addext", "subjectAltName=DNS:localhost,DNS:"+other+",IP:127.0.0.1,URI:spiffe://fleet/"+other+",email:root@fleet.example.lan",
				"-addext", "nameConstraints=permitted;DNS:.evil.example",
				"-addext", "subjectKeyIdentifier=hash")
			der, err := os.ReadFile(out)
			if err != nil {
				tb.Fatal(err)
			}
			return der
		}},
	}
}

// TestHostileCSRsGetOnlyWhatTheServerDecides: whatever a CSR asks for, through
// every endpoint that issues, the certificate is the server's (its subject
// CN=id only, no SANs, not a CA, KU digital signature and EKU client auth
// only), or the request is refused with a code of the table and nothing is
// written, and a refused enrollment leaves its token usable.
func TestHostileCSRsGetOnlyWhatTheServerDecides(t *testing.T) {
	const other = "pi-other"
	eachWay(t, func(t *testing.T, e *estEnv, anon *http.Client, way csrWay) {
		e.enroll(t, e.mintToken(t, other, 1), genP256(t), other)
		for i, hc := range hostileCSRs() {
			t.Run(hc.name, func(t *testing.T) {
				want := hc.enroll
				switch {
				case way.free:
					want = hc.free
				case way.renew && strings.HasPrefix(way.name, "EST"):
					want = hc.reenroll
				case way.renew:
					want = hc.renew
				}
				id := fmt.Sprintf("pi-%02d", i)
				wantOutcome(t, e, anon, way, id, hc.csr(t, genP256(t), id, other), want, other)
			})
		}
	})
}

// eachWay runs test for every way in, each on a server of its own, in
// parallel: the fleet state a refusal must leave alone is then that way's
// alone, and one way's commits overlap another's.
func eachWay(t *testing.T, test func(t *testing.T, e *estEnv, anon *http.Client, way csrWay)) {
	for _, way := range csrWays {
		t.Run(way.name, func(t *testing.T) {
			t.Parallel()
			e := newESTEnv(t, estOptions{})
			test(t, e, e.client(t, nil), way)
		})
	}
}

// wantOutcome sends der for device id the way way does and checks the
// outcome: a certificate exactly as the server makes it for the CSR's key
// (want ""), or a refusal with code want that writes nothing, not even to
// the certificate records of others, and leaves an enrollment token usable. It returns the
// refusal's message.
func wantOutcome(t *testing.T, e *estEnv, anon *http.Client, way csrWay, id string, der []byte, want Code, others ...string) string {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatalf("the test's CSR does not parse: %v", err)
	}
	send := way.prepare(t, e, anon, id)
	ids := append([]string{id}, others...)
	before := fleetAndCerts(t, e, ids...)
	rep, cert := send(der)
	if want == "" {
		if cert == nil {
			t.Fatalf("refused: %d %s", rep.status, rep.body)
		}
		wantDeviceCert(t, e.ca, cert, id, csr.PublicKey)
		return ""
	}
	if cert != nil {
		t.Fatalf("issued %s, want %s", cert.Subject, want)
	}
	msg := wantRefused(t, rep, want, before, fleetAndCerts(t, e, ids...))
	if !way.renew {
		// The refusal came before the token was spent.
		if rep, cert := send(estCSR(t, genP256(t), id)); cert == nil {
			t.Errorf("the token was spent by the refused request: %d %s", rep.status, rep.body)
		}
	}
	return msg
}

// resignedCSR returns der signed again by key with hash h, named as alg:
// x509 refuses to sign with MD5, and a client may use it all the same.
func resignedCSR(tb testing.TB, der []byte, key *rsa.PrivateKey, h crypto.Hash, alg asn1.ObjectIdentifier) []byte {
	tb.Helper()
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		tb.Fatal(err)
	}
	hh := h.New()
	hh.Write(csr.RawTBSCertificateRequest)
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, h, hh.Sum(nil))
	if err != nil {
		tb.Fatal(err)
	}
	return assembleCSR(tb, csr.RawTBSCertificateRequest, pkix.AlgorithmIdentifier{Algorithm: alg, Parameters: asn1.NullRawValue}, sig)
}

// TestCSRSignatureAndKeyPolicy: through every endpoint that issues, a CSR
// signed with SHA-1 or MD5 is refused as csr_invalid, saying to sign with
// SHA-256, and a key outside ECDSA P-256/P-384, Ed25519 and RSA 2048-8192
// as key_unsupported; those keys, signed with SHA-256 or better, are
// certified.
func TestCSRSignatureAndKeyPolicy(t *testing.T) {
	gen := func(c elliptic.Curve) *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	rsa2048, rsa1024 := genRSA(t, 2048), genRSA(t, 1024)
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signed := func(key crypto.Signer, alg x509.SignatureAlgorithm) func(tb testing.TB, id string) []byte {
		return func(tb testing.TB, id string) []byte {
			der, err := x509.CreateCertificateRequest(rand.Reader,
				&x509.CertificateRequest{Subject: pkix.Name{CommonName: id}, SignatureAlgorithm: alg}, key)
			if err != nil {
				tb.Fatalf("create csr: %v", err)
			}
			return der
		}
	}
	cases := []struct {
		name string
		csr  func(tb testing.TB, id string) []byte
		code Code
		msg  string // in the refusal's message
	}{
		{"RSA with SHA-1", signed(rsa2048, x509.SHA1WithRSA), CodeCSRInvalid, "signed with SHA-1"},
		{"ECDSA with SHA-1", signed(gen(elliptic.P256()), x509.ECDSAWithSHA1), CodeCSRInvalid, "signed with SHA-1"},
		{"RSA with MD5", func(tb testing.TB, id string) []byte {
			return resignedCSR(tb, signed(rsa2048, x509.SHA256WithRSA)(tb, id), rsa2048, crypto.MD5, asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 4})
		}, CodeCSRInvalid, "signed with MD5"},
		{"RSA 1024", signed(rsa1024, x509.SHA256WithRSA), CodeKeyUnsupported, "rsa key of 1024 bits"},
		{"ECDSA P-224", signed(gen(elliptic.P224()), x509.ECDSAWithSHA256), CodeKeyUnsupported, "curve P-224"},
		{"ECDSA P-521", signed(gen(elliptic.P521()), x509.ECDSAWithSHA512), CodeKeyUnsupported, "curve P-521"},
		{"RSA 2048 with SHA-256", signed(rsa2048, x509.SHA256WithRSA), "", ""},
		{"RSA 2048 with SHA-512", signed(rsa2048, x509.SHA512WithRSA), "", ""},
		{"RSA 2048 with PSS SHA-256", signed(rsa2048, x509.SHA256WithRSAPSS), "", ""},
		{"ECDSA P-256", signed(gen(elliptic.P256()), x509.ECDSAWithSHA256), "", ""},
		{"ECDSA P-384", signed(gen(elliptic.P384()), x509.ECDSAWithSHA384), "", ""},
		{"Ed25519", signed(ed, x509.PureEd25519), "", ""},
	}
	eachWay(t, func(t *testing.T, e *estEnv, anon *http.Client, way csrWay) {
		for i, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				id := fmt.Sprintf("pi-%02d", i)
				msg := wantOutcome(t, e, anon, way, id, tc.csr(t, id), tc.code)
				if !strings.Contains(msg, tc.msg) {
					t.Errorf("message %q does not say %q", msg, tc.msg)
				}
				if tc.code == CodeCSRInvalid && !strings.Contains(msg, "SHA-256") {
					t.Errorf("message %q does not say to sign with SHA-256", msg)
				}
			})
		}
	})
}
