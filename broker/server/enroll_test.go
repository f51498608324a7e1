package server_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
)

func TestEnrollRenewRevokeCRL(t *testing.T) {
	s := startServer(t)
	tok := s.token(t, "--label", "site=lab")
	d := s.enroll(t, tok, "pi-0001")

	if d.cert.Subject.CommonName != "pi-0001" || d.resp.DeviceID != "pi-0001" {
		t.Fatalf("certificate CN %q, device_id %q", d.cert.Subject.CommonName, d.resp.DeviceID)
	}
	if want := "mqtts://127.0.0.1:"; !strings.HasPrefix(d.resp.BrokerURL, want) || strings.HasSuffix(d.resp.BrokerURL, ":8883") {
		t.Errorf("broker_url %q, want the bound MQTT port behind %s", d.resp.BrokerURL, want)
	}
	if _, err := d.cert.Verify(x509.VerifyOptions{Roots: s.CA().Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("issued certificate does not verify: %v", err)
	}

	// Renew over mTLS with a new key.
	newKeyPair := newKey(t)
	a := s.post(t, s.client(d.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(t, newKeyPair, "pi-0001"))
	if a.status != http.StatusOK {
		t.Fatalf("renew: %d %s", a.status, a.body)
	}
	renewed := &device{key: newKeyPair, cert: parseCert(t, a.resp.Certificate)}
	if renewed.cert.SerialNumber.Cmp(d.cert.SerialNumber) == 0 {
		t.Fatal("renewal returned the same serial")
	}
	dev, err := s.Store().Device(context.Background(), "pi-0001")
	if err != nil || dev.Serial != enroll.SerialHex(renewed.cert.SerialNumber) || dev.LastRenewal.IsZero() {
		t.Fatalf("device after renewal: %+v, %v", dev, err)
	}
	if dev.Labels["site"] != "lab" {
		t.Errorf("token labels not carried to the device: %v", dev.Labels)
	}

	// The PEM answer, for curl users.
	a = s.post(t, s.client(renewed.tlsCert()), "/v1/renew",
		map[string]string{"Content-Type": "application/pkcs10", "Accept": "application/x-pem-file"}, csrPEM(t, newKeyPair, ""))
	if a.status != http.StatusOK || strings.Count(string(a.body), "BEGIN CERTIFICATE") != 2 {
		t.Fatalf("PEM renewal: %d %s", a.status, a.body)
	}

	out, errs, code := s.cli(t, "device", "revoke", "pi-0001")
	if code != 0 || !strings.Contains(out, "revoked") {
		t.Fatalf("device revoke: %d %s %s", code, out, errs)
	}

	// The CRL lists every serial of the device.
	crl := fetchCRL(t, s)
	listed := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		listed[enroll.SerialHex(e.SerialNumber)] = true
	}
	for _, c := range []*x509.Certificate{d.cert, renewed.cert} {
		if !listed[enroll.SerialHex(c.SerialNumber)] {
			t.Errorf("CRL does not list %s", enroll.SerialHex(c.SerialNumber))
		}
	}
	if crl.NextUpdate.Sub(crl.ThisUpdate) < 7*24*time.Hour {
		t.Errorf("CRL next update only %v ahead", crl.NextUpdate.Sub(crl.ThisUpdate))
	}

	a = s.post(t, s.client(renewed.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(t, newKey(t), "pi-0001"))
	if a.status != http.StatusForbidden || (a.code != "cert_revoked" && a.code != "device_revoked") {
		t.Fatalf("renew after revoke: %d %s", a.status, a.body)
	}

	// Audit trail of the whole story.
	out, _, code = s.cli(t, "audit", "--device", "pi-0001", "--json")
	if code != 0 {
		t.Fatalf("audit: %d", code)
	}
	for _, action := range []string{"token.use", "cert.issue", "cert.renew", "device.revoke", "cert.renew_fail"} {
		if !strings.Contains(out, `"`+action+`"`) {
			t.Errorf("audit lacks %s:\n%s", action, out)
		}
	}
}

func fetchCRL(t *testing.T, s *testServer) *x509.RevocationList {
	t.Helper()
	resp, err := s.client(nil).Get(s.url("/v1/crl"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	der, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/pkix-crl" {
		t.Fatalf("GET /v1/crl: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := crl.CheckSignatureFrom(s.CA().Cert()); err != nil {
		t.Fatalf("CRL signature: %v", err)
	}
	return crl
}

// proof builds the JSON body of a renewal after expiry.
func proof(t *testing.T, old *device, csr []byte) []byte {
	t.Helper()
	block, _ := pem.Decode(csr)
	digest := sha256.Sum256(block.Bytes)
	sig, err := old.key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(enroll.RenewProof{
		CSR:         string(csr),
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: old.cert.Raw})),
		Signature:   base64.StdEncoding.EncodeToString(sig),
	})
	return b
}

func TestRenewAfterExpiry(t *testing.T) {
	s := startServer(t, func(c *server.Config) {
		c.CertLifetime = time.Hour
		c.RenewGrace = 24 * time.Hour
	})
	jsonHdr := map[string]string{"Content-Type": "application/json"}

	d := s.enroll(t, s.token(t), "pi-late")
	s.clock.Advance(2 * time.Hour) // expired an hour ago: inside the grace

	// A still-valid certificate cannot be replaced by a proof for another key.
	other := s.enroll(t, s.token(t), "pi-other")
	bad := proof(t, &device{key: newKey(t), cert: other.cert}, csrPEM(t, newKey(t), "pi-other"))
	if a := s.post(t, s.client(nil), "/v1/renew", jsonHdr, bad); a.code != "proof_invalid" {
		t.Fatalf("proof by the wrong key: %d %s", a.status, a.body)
	}

	// Proof form: no client certificate in TLS.
	k2 := newKey(t)
	a := s.post(t, s.client(nil), "/v1/renew", jsonHdr, proof(t, d, csrPEM(t, k2, "pi-late")))
	if a.status != http.StatusOK {
		t.Fatalf("renew after expiry with proof: %d %s", a.status, a.body)
	}
	d2 := &device{key: k2, cert: parseCert(t, a.resp.Certificate)}
	if !d2.cert.NotAfter.After(s.clock.Now()) {
		t.Fatalf("renewed certificate already expired: %v", d2.cert.NotAfter)
	}

	// TLS form: the expired certificate presented in the handshake.
	s.clock.Advance(2 * time.Hour)
	a = s.post(t, s.client(d2.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(t, newKey(t), "pi-late"))
	if a.status != http.StatusOK {
		t.Fatalf("renew after expiry over TLS: %d %s", a.status, a.body)
	}

	// Outside the grace: refused both ways, with the code that says "new token".
	s.clock.Advance(48 * time.Hour)
	a = s.post(t, s.client(nil), "/v1/renew", jsonHdr, proof(t, d2, csrPEM(t, newKey(t), "pi-late")))
	if a.status != http.StatusUnauthorized || a.code != "cert_expired" {
		t.Fatalf("renew outside grace: %d %s", a.status, a.body)
	}
	a = s.post(t, s.client(d2.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(t, newKey(t), "pi-late"))
	if a.code != "cert_expired" {
		t.Fatalf("renew outside grace over TLS: %d %s", a.status, a.body)
	}

	// The operator re-provisions it: the same id, a new key and
	// certificate, through a token that says so.
	if _, errs, code := s.cli(t, "token", "create", "--device", "pi-late"); code != 1 || !strings.Contains(errs, "--reprovision") {
		t.Fatalf("token for an existing id without --reprovision: %d %s", code, errs)
	}
	d3 := s.enroll(t, s.token(t, "--device", "pi-late", "--reprovision"), "pi-late")
	if d3.cert.Subject.CommonName != "pi-late" || !d3.cert.NotAfter.After(s.clock.Now()) {
		t.Fatalf("re-provisioned certificate: CN %q, not after %v", d3.cert.Subject.CommonName, d3.cert.NotAfter)
	}
	r := dialMQTT(t, s.MQTTAddr().String(), s.mqttTLS(d3))
	if code := r.connect("pi-late", 30); code != 0 {
		t.Fatalf("re-provisioned device: CONNACK %d", code)
	}
	out, _, _ := s.cli(t, "audit", "--device", "pi-late")
	if !strings.Contains(out, "device.reprovision") {
		t.Fatalf("audit has no re-provisioning:\n%s", out)
	}
}

func TestSingleUseTokenConcurrent(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.Enroll.FailureBurst = 1000 })
	tok := s.token(t)
	const n = 50
	var wg sync.WaitGroup
	statuses := make(chan answer, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses <- s.post(t, s.client(nil), "/v1/enroll", bearer(tok), csrPEM(t, newKey(t), "racer-"+string(rune('a'+i%26))+strings.Repeat("x", i/26)))
		}()
	}
	wg.Wait()
	close(statuses)
	won := 0
	for a := range statuses {
		switch {
		case a.status == http.StatusCreated:
			won++
		case a.code != "token_used":
			t.Errorf("loser got %d %s, want token_used", a.status, a.body)
		}
	}
	if won != 1 {
		t.Fatalf("%d enrollments succeeded on a single-use token", won)
	}
	devs, _ := s.Store().Devices(context.Background())
	if len(devs) != 1 {
		t.Fatalf("%d devices stored", len(devs))
	}
}

func TestEnrollBadInput(t *testing.T) {
	s := startServer(t, func(c *server.Config) { c.Enroll.FailureBurst = 1000 })
	existing := s.enroll(t, s.token(t), "taken")
	s.enroll(t, s.token(t), "gone")
	if _, errs, code := s.cli(t, "device", "revoke", "gone"); code != 0 {
		t.Fatalf("device revoke: %s", errs)
	}
	free := s.token(t, "--uses", "100")
	bound := s.token(t, "--device", "bound-1")
	expired := s.token(t, "--ttl", "1h")
	used := s.token(t)
	s.enroll(t, used, "used-once")
	revoked := s.token(t)
	pt, err := enroll.ParseToken(revoked)
	if err != nil {
		t.Fatal(err)
	}
	if _, errs, code := s.cli(t, "token", "revoke", enroll.TokenID(pt.Hash)); code != 0 {
		t.Fatalf("token revoke: %s", errs)
	}
	s.clock.Advance(2 * time.Hour) // expires "expired" only: the others last 24h

	key := newKey(t)
	good := csrPEM(t, key, "fresh-1")
	brokenSig := corruptSignature(t, good)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	weak, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "weak"}}, rsa1024)
	hdr := func(tok string) map[string]string { return bearer(tok) }
	otherCN := csrPEM(t, newKey(t), "taken")

	cases := []struct {
		name   string
		hdr    map[string]string
		body   []byte
		status int
		code   string
	}{
		{"no token", map[string]string{"Content-Type": "application/pkcs10"}, good, 401, "token_missing"},
		{"basic auth", map[string]string{"Authorization": "Basic Zm9vOmJhcg==", "Content-Type": "application/pkcs10"}, good, 401, "token_missing"},
		{"malformed token", hdr("fmq1.nope"), good, 401, "token_invalid"},
		{"unknown token", hdr(strings.Replace(free, free[5:10], "AAAAA", 1)), good, 401, "token_unknown"},
		{"expired token", hdr(expired), good, 401, "token_expired"},
		{"used token", hdr(used), good, 401, "token_used"},
		{"revoked token", hdr(revoked), good, 401, "token_revoked"},
		{"malformed PEM", hdr(free), []byte("-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n"), 400, "csr_invalid"},
		{"broken signature", hdr(free), brokenSig, 400, "csr_invalid"},
		{"RSA-1024", hdr(free), weak, 400, "key_unsupported"},
		{"id with slash", hdr(free), csrPEM(t, key, "a/b"), 400, "id_invalid"},
		{"id plus", hdr(free), csrPEM(t, key, "+"), 400, "id_invalid"},
		{"id hash", hdr(free), csrPEM(t, key, "#"), 400, "id_invalid"},
		{"id upper case", hdr(free), csrPEM(t, key, "Pi-1"), 400, "id_invalid"},
		{"id 65 chars", hdr(free), csrPEM(t, key, strings.Repeat("a", 65)), 400, "id_invalid"},
		{"id empty", hdr(free), csrPEM(t, key, ""), 400, "id_invalid"},
		{"id taken", hdr(free), otherCN, 409, "id_taken"},
		{"bound token other id", hdr(bound), csrPEM(t, key, "not-bound"), 403, "id_mismatch"},
		{"oversized body", hdr(free), make([]byte, enroll.MaxBodySize+1), 413, "body_too_large"},
		{"empty body", hdr(free), nil, 400, "csr_invalid"},
		{"wrong content type", map[string]string{"Authorization": "Bearer " + free, "Content-Type": "application/x-www-form-urlencoded"}, good, 415, "unsupported_media_type"},
	}
	before := s.snapshot(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := s.post(t, s.client(nil), "/v1/enroll", c.hdr, c.body)
			if a.status != c.status || a.code != c.code {
				t.Errorf("got %d %s, want %d %s", a.status, a.body, c.status, c.code)
			}
		})
	}
	// A revoked id is taken too, and the answer says it never comes back:
	// re-provisioning, the way out for a taken id, is refused for it.
	a := s.post(t, s.client(nil), "/v1/enroll", hdr(free), csrPEM(t, newKey(t), "gone"))
	if a.status != 409 || a.code != "id_taken" || !strings.Contains(string(a.body), "revoked ids are never used again") {
		t.Errorf("free token, CN of a revoked device: got %d %s", a.status, a.body)
	}
	if after := s.snapshot(t); after != before {
		t.Errorf("refused enrollments changed the store:\nbefore %s\nafter  %s", before, after)
	}

	// Renewal with another device's CN, and without a certificate.
	a = s.post(t, s.client(existing.tlsCert()), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, csrPEM(t, newKey(t), "used-once"))
	if a.status != 403 || a.code != "id_mismatch" {
		t.Errorf("renew for another CN: %d %s", a.status, a.body)
	}
	a = s.post(t, s.client(nil), "/v1/renew", map[string]string{"Content-Type": "application/pkcs10"}, good)
	if a.status != 401 || a.code != "cert_required" {
		t.Errorf("renew without certificate: %d %s", a.status, a.body)
	}
	if after := s.snapshot(t); after != before {
		t.Errorf("refused renewals changed the store")
	}
	if strings.Contains(s.logs.String(), free) || strings.Contains(s.logs.String(), strings.Split(free, ".")[1]) {
		t.Error("a token appears in the server log")
	}
}

func corruptSignature(t *testing.T, csr []byte) []byte {
	t.Helper()
	block, _ := pem.Decode(csr)
	der := append([]byte(nil), block.Bytes...)
	der[len(der)-3] ^= 0xff // inside the signature BIT STRING
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func TestFailedAttemptsRateLimited(t *testing.T) {
	s := startServer(t, func(c *server.Config) {
		c.Enroll.FailureBurst = 3
		c.Enroll.FailureRate = 0.001
	})
	for i := range 3 {
		if a := s.post(t, s.client(nil), "/v1/enroll", bearer("fmq1.bad"), []byte("x")); a.code != "token_invalid" {
			t.Fatalf("attempt %d: %d %s", i, a.status, a.body)
		}
	}
	a := s.post(t, s.client(nil), "/v1/enroll", bearer("fmq1.bad"), []byte("x"))
	if a.status != http.StatusTooManyRequests || a.code != "rate_limited" || a.header.Get("Retry-After") == "" {
		t.Fatalf("4th failure: %d %s Retry-After=%q", a.status, a.body, a.header.Get("Retry-After"))
	}
	// Even a valid token waits: the address is throttled, not the token.
	if a := s.post(t, s.client(nil), "/v1/enroll", bearer(s.token(t)), csrPEM(t, newKey(t), "late")); a.status != http.StatusTooManyRequests {
		t.Fatalf("valid enrollment from a throttled address: %d", a.status)
	}
}

// TestReprovisionRevokesEarlierCertificates: re-provisioning says the
// device's key is gone, maybe into other hands. Its earlier certificates
// used to stay valid and could renew for good, so a kept key went on as
// the device next to the new one. They are now revoked: the live session
// on one is closed at once, it is refused by the broker and for renewal,
// and the CRL lists it; the device on its new certificate is a device as
// any other, its telemetry delivered.
func TestReprovisionRevokesEarlierCertificates(t *testing.T) {
	s := startServer(t)
	old := s.enroll(t, s.token(t), "pi-rp")
	lost := make(chan error, 1)
	oldClient := pahoClient(t, s, old, "pi-rp", lost)
	defer oldClient.Disconnect(0)
	svc := serviceClient(t, s, "svc-rp")
	defer svc.Disconnect(0)
	msgs := subscribe(t, svc, "devices/+/telemetry")

	s.clock.Advance(time.Minute) // records list newest first
	start := time.Now()
	fresh := s.enroll(t, s.token(t, "--device", "pi-rp", "--reprovision"), "pi-rp")
	lostWithinASecond(t, lost, start, "the old certificate's session")
	if _, a := s.renewOver(t, old); a.code != "cert_revoked" {
		t.Fatalf("renewal with the old certificate: %d %s, want cert_revoked", a.status, a.body)
	}
	if err := s.handshake(old); err == nil {
		t.Fatal("the old certificate's handshake was not refused")
	}
	listed := false
	for _, e := range fetchCRL(t, s).RevokedCertificateEntries {
		if e.SerialNumber.Cmp(old.cert.SerialNumber) == 0 {
			listed = true
		}
		if e.SerialNumber.Cmp(fresh.cert.SerialNumber) == 0 {
			t.Fatal("the new certificate is on the CRL")
		}
	}
	if !listed {
		t.Fatal("the old certificate is not on the CRL")
	}

	// device show lists both, newest first, with their states.
	out, errs, code := s.cli(t, "device", "show", "pi-rp")
	oldSerial, freshSerial := enroll.SerialHex(old.cert.SerialNumber), enroll.SerialHex(fresh.cert.SerialNumber)
	_, certs, _ := strings.Cut(out, "CERTIFICATE")
	lines := strings.Split(strings.TrimSpace(certs), "\n")
	if code != 0 || len(lines) != 3 ||
		!strings.HasPrefix(lines[1], freshSerial) || !strings.HasSuffix(lines[1], "current") ||
		!strings.HasPrefix(lines[2], oldSerial) || !strings.Contains(lines[2], "revoked") {
		t.Fatalf("device show (%d %s):\n%s", code, errs, out)
	}

	c := pahoClient(t, s, fresh, "pi-rp", nil)
	defer c.Disconnect(0)
	publish(t, c, "devices/pi-rp/telemetry", `{"n":1}`)
	if m := nextMessage(t, msgs, 10*time.Second, "the new certificate's telemetry"); string(m.Payload()) != `{"n":1}` {
		t.Fatalf("service got %q", m.Payload())
	}
}
