package server_test

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
)

// reply is the answer to a hostile request: its status and stable error code.
type reply struct {
	status int
	code   string
	body   string
}

// errorCode extracts the stable code of an error answer: the JSON
// {"code": ...} of the /v1 API, or the "code: message" text of EST (RFC 7030
// wants plain-text errors). An error answer in any other shape fails.
func errorCode(tb testing.TB, path string, status int, contentType string, body []byte) string {
	tb.Helper()
	if strings.HasPrefix(path, "/.well-known/est/") {
		code, _, ok := strings.Cut(string(body), ": ")
		if !ok || !strings.HasPrefix(contentType, "text/plain") {
			tb.Fatalf("%s: %d with an EST error body %q (%s)", path, status, body, contentType)
		}
		return code
	}
	var e struct{ Code string }
	if !strings.HasPrefix(contentType, "application/json") || json.Unmarshal(body, &e) != nil || e.Code == "" {
		tb.Fatalf("%s: %d with a body that is not a JSON error: %q (%s)", path, status, body, contentType)
	}
	return e.Code
}

// ask sends one request through a real HTTPS client.
func (s *testServer) ask(tb testing.TB, c *http.Client, method, path string, hdr map[string]string, body io.Reader) reply {
	tb.Helper()
	req, err := http.NewRequest(method, s.url(path), body)
	if err != nil {
		tb.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r := reply{status: resp.StatusCode, body: string(b)}
	if resp.StatusCode >= 400 {
		r.code = errorCode(tb, path, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	return r
}

// rawHTTPS opens a TLS connection to the enrollment endpoint for requests
// no HTTP client would send.
func (s *testServer) rawHTTPS(tb testing.TB) *tls.Conn {
	tb.Helper()
	c, err := tls.Dial("tcp", s.EnrollAddr().String(), &tls.Config{RootCAs: s.CA().Pool(), ServerName: "127.0.0.1"})
	if err != nil {
		tb.Fatalf("dial enrollment endpoint: %v", err)
	}
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

// rawAsk writes head (and body) on a new connection, half-closes it if
// closeWrite, and reads the answer.
func (s *testServer) rawAsk(tb testing.TB, path, head string, body []byte, closeWrite bool) reply {
	tb.Helper()
	c := s.rawHTTPS(tb)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, head); err != nil {
		tb.Fatal(err)
	}
	if _, err := c.Write(body); err != nil {
		tb.Fatal(err)
	}
	if closeWrite {
		if err := c.CloseWrite(); err != nil {
			tb.Fatal(err)
		}
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		tb.Fatalf("read answer: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r := reply{status: resp.StatusCode, body: string(b)}
	if resp.StatusCode >= 400 && path != "" {
		r.code = errorCode(tb, path, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	return r
}

func csrFor(tb testing.TB, key crypto.Signer, subject pkix.Name) []byte {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: subject}, key)
	if err != nil {
		tb.Fatalf("create CSR for %q: %v", subject.CommonName, err)
	}
	return der
}

func pemCSR(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// foreignToken is a well-formed token minted for another CA.
func foreignToken(tb testing.TB) string {
	tb.Helper()
	secret, fp := make([]byte, 32), make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		tb.Fatal(err)
	}
	if _, err := rand.Read(fp); err != nil {
		tb.Fatal(err)
	}
	return "fmq1." + base64.RawURLEncoding.EncodeToString(secret) + "." + hex.EncodeToString(fp)
}

// TestHostileEnrollmentRequests throws malformed, oversized, slow and
// deceitful requests at the enrollment API of a running node. Every one
// that reaches the API is a 4xx with a stable code (JSON, or RFC 7030 text
// on EST paths); the few that HTTP itself refuses get net/http's own 4xx;
// none changes the store; and the node serves a real device afterwards.
func TestHostileEnrollmentRequests(t *testing.T) {
	const readHeaderTimeout, readTimeout = 2 * time.Second, 3 * time.Second
	s := startServer(t, func(c *server.Config) {
		c.Enroll.FailureBurst = 10_000 // every refusal counts as a failure; none may be rate limited here
		c.EnrollReadHeaderTimeout = readHeaderTimeout
		c.EnrollReadTimeout = readTimeout
	})
	free := s.token(t, "--uses", "1000")
	victim := s.enroll(t, s.token(t), "victim")
	hc := s.client(nil)

	key := newKey(t)
	good := csrFor(t, key, pkix.Name{CommonName: "fresh-1"})
	goodPEM := pemCSR(good)
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	cn := func(name string) []byte { return pemCSR(csrFor(t, key, pkix.Name{CommonName: name})) }
	auth := func(tok string) map[string]string {
		return map[string]string{"Authorization": "Bearer " + tok, "Content-Type": "application/pkcs10"}
	}
	with := func(h map[string]string, k, v string) map[string]string {
		out := maps.Clone(h)
		out[k] = v
		return out
	}
	estAuth := func(ct string) map[string]string {
		return map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("dev:"+free)), "Content-Type": ct}
	}
	jsonCT := map[string]string{"Content-Type": "application/json"}
	proofOf := func(csr []byte, certPEM string, sig string) []byte {
		b, _ := json.Marshal(enroll.RenewProof{CSR: string(csr), Certificate: certPEM, Signature: sig})
		return b
	}
	victimPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: victim.cert.Raw}))
	// A self-signed certificate for the victim's name, with a valid proof:
	// only the chain check can refuse it.
	impostorKey := newKey(t)
	impostor := selfSigned(t, impostorKey, "victim")
	renewCSR := pemCSR(csrFor(t, newKey(t), pkix.Name{CommonName: "victim"}))
	impostorProof := signedProof(t, impostorKey, impostor, renewCSR)

	cases := []struct {
		name   string
		method string
		path   string
		hdr    map[string]string
		body   []byte
		status int
		code   string
	}{
		// Bodies.
		{"truncated PEM CSR", "POST", "/v1/enroll", auth(free), goodPEM[:len(goodPEM)/2], 400, "csr_invalid"},
		{"truncated DER CSR", "POST", "/v1/enroll", auth(free), good[:len(good)-20], 400, "csr_invalid"},
		{"CSR with trailing garbage", "POST", "/v1/enroll", auth(free), append(append([]byte{}, goodPEM...), "garbage"...), 400, "csr_invalid"},
		{"empty body", "POST", "/v1/enroll", auth(free), nil, 400, "csr_invalid"},
		{"oversized body", "POST", "/v1/enroll", auth(free), bytes.Repeat([]byte("A"), enroll.MaxBodySize+1), 413, "body_too_large"},
		{"binary garbage", "POST", "/v1/enroll", auth(free), []byte("\x00\xff\x30\x82\xff\xff\x00"), 400, "csr_invalid"},
		// Content types.
		{"text/plain", "POST", "/v1/enroll", with(auth(free), "Content-Type", "text/plain"), goodPEM, 415, "unsupported_media_type"},
		{"JSON to /v1/enroll", "POST", "/v1/enroll", with(auth(free), "Content-Type", "application/json"), goodPEM, 415, "unsupported_media_type"},
		{"malformed content type", "POST", "/v1/enroll", with(auth(free), "Content-Type", "application/pkcs10; =;"), goodPEM, 415, "unsupported_media_type"},
		{"multipart", "POST", "/v1/enroll", with(auth(free), "Content-Type", "multipart/form-data; boundary=x"), goodPEM, 415, "unsupported_media_type"},
		// Keys.
		{"RSA-1024 key", "POST", "/v1/enroll", auth(free), pemCSR(csrFor(t, rsa1024, pkix.Name{CommonName: "weak-1"})), 400, "key_unsupported"},
		{"P-224 key", "POST", "/v1/enroll", auth(free), pemCSR(csrFor(t, p224, pkix.Name{CommonName: "weak-2"})), 400, "key_unsupported"},
		{"P-521 key", "POST", "/v1/enroll", auth(free), pemCSR(csrFor(t, p521, pkix.Name{CommonName: "weak-3"})), 400, "key_unsupported"},
		// Names.
		{"CN dev/../x", "POST", "/v1/enroll", auth(free), cn("dev/../x"), 400, "id_invalid"},
		{"CN dev+", "POST", "/v1/enroll", auth(free), cn("dev+"), 400, "id_invalid"},
		{"CN dev#", "POST", "/v1/enroll", auth(free), cn("dev#"), 400, "id_invalid"},
		{"CN with NUL", "POST", "/v1/enroll", auth(free), cn("dev\x00x"), 400, "id_invalid"},
		{"CN Cyrillic look-alike", "POST", "/v1/enroll", auth(free), cn("d\u0435v-1"), 400, "id_invalid"},
		{"CN full-width", "POST", "/v1/enroll", auth(free), cn("\uff44\uff45\uff56"), 400, "id_invalid"},
		{"CN zero-width joiner", "POST", "/v1/enroll", auth(free), cn("de\u200dv"), 400, "id_invalid"},
		{"CN $SYS", "POST", "/v1/enroll", auth(free), cn("$SYS"), 400, "id_invalid"},
		{"CN upper case", "POST", "/v1/enroll", auth(free), cn("DEV-1"), 400, "id_invalid"},
		{"CN 65 characters", "POST", "/v1/enroll", auth(free), cn(strings.Repeat("d", 65)), 400, "id_invalid"},
		{"CN inline, mochi's own client", "POST", "/v1/enroll", auth(free), cn("inline"), 400, "id_invalid"},
		{"CN of an enrolled device", "POST", "/v1/enroll", auth(free), cn("victim"), 409, "id_taken"},
		// Tokens and headers.
		{"10,000-character header", "POST", "/v1/enroll", with(auth(free), "X-Pad", strings.Repeat("p", 10_000)), goodPEM, 431, "header_too_large"},
		{"10,000-character token", "POST", "/v1/enroll", auth(strings.Repeat("t", 10_000)), goodPEM, 431, "header_too_large"},
		{"token with look-alike prefix", "POST", "/v1/enroll", auth(strings.Replace(free, "q", "\u051b", 1)) /* Cyrillic qa */, goodPEM, 401, "token_invalid"},
		{"token of another CA", "POST", "/v1/enroll", auth(foreignToken(t)), goodPEM, 401, "token_unknown"},
		{"token as Basic password", "POST", "/v1/enroll", estAuth("application/pkcs10"), goodPEM, 401, "token_missing"},
		{"no Authorization", "POST", "/v1/enroll", map[string]string{"Content-Type": "application/pkcs10"}, goodPEM, 401, "token_missing"},
		// Methods and paths.
		{"GET /v1/enroll", "GET", "/v1/enroll", nil, nil, 405, "method_not_allowed"},
		{"DELETE /v1/ca", "DELETE", "/v1/ca", nil, nil, 405, "method_not_allowed"},
		{"unknown path", "POST", "/v1/admin/tokens", auth(free), goodPEM, 404, "not_found"},
		{"encoded dot segments", "GET", "/v1/%2e%2e/%2e%2e/etc/passwd", nil, nil, 404, "not_found"},
		// EST.
		{"EST PEM body", "POST", "/.well-known/est/simpleenroll", estAuth("application/pkcs10"), goodPEM, 400, "csr_invalid"},
		{"EST non-base64 body", "POST", "/.well-known/est/simpleenroll", estAuth("application/pkcs10"), []byte("!!not base64!!"), 400, "csr_invalid"},
		{"EST JSON content type", "POST", "/.well-known/est/simpleenroll", estAuth("application/json"), []byte(base64.StdEncoding.EncodeToString(good)), 415, "unsupported_media_type"},
		{"EST reenroll without certificate", "POST", "/.well-known/est/simplereenroll", map[string]string{"Content-Type": "application/pkcs10"}, []byte(base64.StdEncoding.EncodeToString(good)), 401, "cert_required"},
		// Renewal proofs.
		{"proof not JSON", "POST", "/v1/renew", jsonCT, []byte("{"), 400, "bad_request"},
		{"proof unknown field", "POST", "/v1/renew", jsonCT, []byte(`{"csr":"","certificate":"","signature":"","admin":true}`), 400, "bad_request"},
		{"proof trailing brace", "POST", "/v1/renew", jsonCT, append(proofOf(renewCSR, victimPEM, "AA=="), '}'), 400, "bad_request"},
		{"proof deep nesting", "POST", "/v1/renew", jsonCT, bytes.Repeat([]byte("["), 60_000), 400, "bad_request"},
		{"proof certificate garbage", "POST", "/v1/renew", jsonCT, proofOf(renewCSR, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "AA=="), 401, "cert_invalid"},
		{"proof signature not base64", "POST", "/v1/renew", jsonCT, proofOf(renewCSR, victimPEM, "%%%"), 401, "proof_invalid"},
		{"proof by someone else's key", "POST", "/v1/renew", jsonCT, signedProof(t, newKey(t), victim.cert.Raw, renewCSR), 401, "proof_invalid"},
		{"proof with a self-signed certificate", "POST", "/v1/renew", jsonCT, impostorProof, 401, "cert_invalid"},
		{"proof oversized", "POST", "/v1/renew", jsonCT, proofOf(renewCSR, victimPEM, strings.Repeat("A", enroll.MaxBodySize)), 413, "body_too_large"},
		{"renew without certificate", "POST", "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, renewCSR, 401, "cert_required"},
		{"renew text/html", "POST", "/v1/renew", map[string]string{"Content-Type": "text/html"}, renewCSR, 415, "unsupported_media_type"},
	}
	before := s.snapshot(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := s.ask(t, hc, c.method, c.path, c.hdr, bytes.NewReader(c.body))
			if r.status != c.status || r.code != c.code {
				t.Errorf("got %d %s (%q), want %d %s", r.status, r.code, truncated(r.body), c.status, c.code)
			}
		})
	}

	// Requests only a raw connection can send.
	head := func(extra string) string {
		return "POST /v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + free + "\r\nContent-Type: application/pkcs10\r\n" + extra + "\r\n"
	}
	raw := []struct {
		name       string
		head       string
		body       []byte
		closeWrite bool
		status     int
		code       string
	}{
		{"chunked garbage", head("Transfer-Encoding: chunked\r\n"), []byte("zz\r\nhello\r\n0\r\n\r\n"), false, 400, "bad_request"},
		{"chunk longer than sent", head("Transfer-Encoding: chunked\r\n"), []byte("ffff\r\nshort"), true, 400, "bad_request"},
		{"body shorter than Content-Length", head("Content-Length: 500\r\n"), goodPEM[:100], true, 400, "bad_request"},
		{"declared 10 GB body", head("Content-Length: 10000000000\r\n"), nil, false, 413, "body_too_large"},
		{"HTTP/2 preface on HTTP/1", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", nil, false, 404, "not_found"},
		{"chunked body over the limit", head("Transfer-Encoding: chunked\r\n"), chunked(bytes.Repeat([]byte("A"), enroll.MaxBodySize+10)), false, 413, "body_too_large"},
	}
	for _, c := range raw {
		t.Run(c.name, func(t *testing.T) {
			r := s.rawAsk(t, "/v1/enroll", c.head, c.body, c.closeWrite)
			if r.status != c.status || r.code != c.code {
				t.Errorf("got %d %s (%q), want %d %s", r.status, r.code, truncated(r.body), c.status, c.code)
			}
		})
	}

	// Refused by net/http before the API sees them: a plain-text 4xx, and
	// the connection closed. Headers beyond MaxHeaderBytes (64 KiB) are
	// among them. Raising MaxHeaderBytes so that the API could answer in
	// JSON would let every connection make the server buffer that much
	// more; no client of ours sends more than a few hundred bytes of
	// headers, and one value over 8 KiB already gets the JSON
	// header_too_large above. So the limit stays, and Go's 431 stands.
	var pad strings.Builder
	for i := range 80 {
		fmt.Fprintf(&pad, "X-Pad-%d: %s\r\n", i, strings.Repeat("p", 1000))
	}
	protocol := []struct {
		name   string
		head   string
		status int
	}{
		{"headers over 64 KiB", head(pad.String()), 431},
		{"Content-Length and Transfer-Encoding", head("Content-Length: 10\r\nTransfer-Encoding: chunked\r\n"), 400},
		{"NUL in a header value", head("X-Evil: a\x00b\r\n"), 400},
		{"two Content-Lengths", head("Content-Length: 10\r\nContent-Length: 20\r\n"), 400},
		{"garbage request line", "GARBAGE\r\n\r\n", 400},
	}
	for _, c := range protocol {
		t.Run(c.name, func(t *testing.T) {
			r := s.rawAsk(t, "", c.head, nil, false)
			if r.status != c.status {
				t.Errorf("got %d %q, want %d", r.status, truncated(r.body), c.status)
			}
		})
	}

	// A path with dot segments is not cleaned into another endpoint, nor
	// redirected there.
	for _, p := range []string{"/v1/ca/../enroll", "//v1/enroll", "/v1/./enroll"} {
		t.Run("path "+p, func(t *testing.T) {
			r := s.rawAsk(t, "/v1/enroll", "POST "+p+" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "+free+"\r\nContent-Type: application/pkcs10\r\nContent-Length: "+fmt.Sprint(len(goodPEM))+"\r\n\r\n", goodPEM, false)
			if r.status != 404 || r.code != "not_found" {
				t.Errorf("got %d %s %q, want 404 not_found", r.status, r.code, truncated(r.body))
			}
		})
	}

	t.Run("slow body", func(t *testing.T) {
		c := s.rawHTTPS(t)
		start := time.Now()
		if _, err := io.WriteString(c, head("Content-Length: 1000\r\n")); err != nil {
			t.Fatal(err)
		}
		go dribble(c, 1000)
		_ = c.SetReadDeadline(time.Now().Add(readTimeout + 20*time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("no answer to a slow body: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		took := time.Since(start)
		if code := errorCode(t, "/v1/enroll", resp.StatusCode, resp.Header.Get("Content-Type"), b); resp.StatusCode != 400 || code != "bad_request" {
			t.Errorf("slow body answered %d %s", resp.StatusCode, code)
		}
		if took < readTimeout-500*time.Millisecond || took > readTimeout+15*time.Second {
			t.Errorf("slow body answered after %s, want about the read timeout %s", took, readTimeout)
		}
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("connection still open after the read timeout")
		}
	})

	t.Run("slow headers", func(t *testing.T) {
		c := s.rawHTTPS(t)
		start := time.Now()
		if _, err := io.WriteString(c, "POST /v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "); err != nil {
			t.Fatal(err)
		}
		go dribble(c, 1000)
		_ = c.SetReadDeadline(time.Now().Add(readHeaderTimeout + 20*time.Second))
		_, err := c.Read(make([]byte, 512))
		took := time.Since(start)
		if err == nil {
			// net/http may answer before closing; either way the socket ends.
			_, err = io.Copy(io.Discard, c)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection with dribbled headers still open after %s", took)
		}
		if took < readHeaderTimeout-500*time.Millisecond || took > readHeaderTimeout+15*time.Second {
			t.Errorf("closed after %s, want about the header timeout %s", took, readHeaderTimeout)
		}
	})

	if after := s.snapshot(t); after != before {
		t.Errorf("hostile requests changed the store:\nbefore %s\nafter  %s", before, after)
	}
	// Still serving: a real device enrolls with the token the hostile
	// requests carried, and the victim renews.
	d := s.enroll(t, free, "fresh-1")
	if d.cert.Subject.CommonName != "fresh-1" {
		t.Fatalf("enrolled %q", d.cert.Subject.CommonName)
	}
	if a := s.post(t, s.client(victim.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, renewCSR); a.status != http.StatusOK {
		t.Fatalf("renew after the hostile requests: %d %s", a.status, a.body)
	}
	if strings.Contains(s.logs.String(), strings.Split(free, ".")[1]) {
		t.Error("the token's secret appears in the server log")
	}
}

// dribble writes one byte every 100 ms until the connection fails or n
// bytes are written.
func dribble(c net.Conn, n int) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for range n {
		<-tick.C
		if _, err := c.Write([]byte("a")); err != nil {
			return
		}
	}
}

// chunked encodes b as one HTTP/1.1 chunk and the last chunk.
func chunked(b []byte) []byte {
	return append(fmt.Appendf(nil, "%x\r\n", len(b)), append(b, "\r\n0\r\n\r\n"...)...)
}

func truncated(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

// selfSigned is a client certificate for cn that no fleet CA issued.
func selfSigned(tb testing.TB, key *ecdsa.PrivateKey, cn string) []byte {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// signedProof is a renewal proof for csr (PEM) signed by key, claiming the
// certificate certDER.
func signedProof(tb testing.TB, key crypto.Signer, certDER, csr []byte) []byte {
	tb.Helper()
	block, _ := pem.Decode(csr)
	digest := sha256.Sum256(block.Bytes)
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		tb.Fatal(err)
	}
	b, _ := json.Marshal(enroll.RenewProof{
		CSR:         string(csr),
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})),
		Signature:   base64.StdEncoding.EncodeToString(sig),
	})
	return b
}

// TestEnrollHandshakeFollowsHandshakeTimeout: --handshake-timeout is the
// deadline of the enrollment listener's TLS handshake too, so that one
// flag makes room for a slow link on both: a socket that never handshakes
// is closed at that deadline, not at a fixed 10 s.
func TestEnrollHandshakeFollowsHandshakeTimeout(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.Broker.HandshakeTimeout = 300 * time.Millisecond })
	c, err := net.Dial("tcp", s.EnrollAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ne net.Error
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("a socket that never handshakes, 5 s on: %v, want closed by the server at 300 ms", err)
	}
}
