package enroll

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// testNow is the fixed clock of most CA tests; certificate times have whole
// seconds, so it has no fraction.
func testNow() time.Time { return time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC) }

// testClock is a settable clock for a single test goroutine.
type testClock struct{ t time.Time }

func (c *testClock) Now() time.Time { return c.t }

func newTestCA(tb testing.TB, now func() time.Time) *CA {
	tb.Helper()
	ca, err := LoadOrCreateCA(CAConfig{Dir: tb.TempDir(), Now: now})
	if err != nil {
		tb.Fatalf("LoadOrCreateCA: %v", err)
	}
	return ca
}

func genP256(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func genRSA(tb testing.TB, bits int) *rsa.PrivateKey {
	tb.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

// testCert is an operator-side certificate and key made at test time.
type testCert struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func createCert(tb testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		tb.Fatalf("create certificate: %v", err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func caTemplate(cn string, now time.Time, serial int64) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"operator"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(2, 0, 0),
		BasicConstraintsValid: true,
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
}

// newRoot makes a self-signed root; mutate, if set, edits the template.
func newRoot(tb testing.TB, key crypto.Signer, now time.Time, mutate func(*x509.Certificate)) testCert {
	tb.Helper()
	tmpl := caTemplate("operator root", now, 1)
	if mutate != nil {
		mutate(tmpl)
	}
	return testCert{createCert(tb, tmpl, tmpl, key.Public(), key), key}
}

func newIntermediate(tb testing.TB, parent testCert, key crypto.Signer, now time.Time) testCert {
	tb.Helper()
	tmpl := caTemplate("operator intermediate", now, 2)
	tmpl.MaxPathLenZero = true
	return testCert{createCert(tb, tmpl, parent.cert, key.Public(), parent.key), key}
}

// withoutSKID re-signs a self-signed ECDSA certificate without its
// SubjectKeyId extension, which Go always adds to CA certificates but older
// operator CAs may lack.
func withoutSKID(tb testing.TB, tc testCert) testCert {
	tb.Helper()
	var cert struct {
		TBS    asn1.RawValue
		SigAlg pkix.AlgorithmIdentifier
		Sig    asn1.BitString
	}
	if _, err := asn1.Unmarshal(tc.cert.Raw, &cert); err != nil {
		tb.Fatal(err)
	}
	var tbs struct {
		Version    int `asn1:"optional,explicit,default:0,tag:0"`
		Serial     *big.Int
		SigAlg     pkix.AlgorithmIdentifier
		Issuer     asn1.RawValue
		Validity   asn1.RawValue
		Subject    asn1.RawValue
		SPKI       asn1.RawValue
		Extensions []pkix.Extension `asn1:"optional,explicit,tag:3"`
	}
	if _, err := asn1.Unmarshal(cert.TBS.FullBytes, &tbs); err != nil {
		tb.Fatal(err)
	}
	tbs.Extensions = slices.DeleteFunc(tbs.Extensions, func(e pkix.Extension) bool {
		return e.Id.Equal(asn1.ObjectIdentifier{2, 5, 29, 14})
	})
	tbsDER, err := asn1.Marshal(tbs)
	if err != nil {
		tb.Fatal(err)
	}
	digest := sha256.Sum256(tbsDER)
	sig, err := tc.key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		tb.Fatal(err)
	}
	cert.TBS = asn1.RawValue{FullBytes: tbsDER}
	cert.Sig = asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}
	der, err := asn1.Marshal(cert)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	if len(c.SubjectKeyId) != 0 {
		tb.Fatal("SubjectKeyId still present")
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		tb.Fatalf("re-signed certificate does not verify: %v", err)
	}
	return testCert{c, tc.key}
}

func certsPEM(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}

func keyPEM(tb testing.TB, key crypto.Signer, format string) []byte {
	tb.Helper()
	var der []byte
	var typ string
	var err error
	switch format {
	case "pkcs8":
		typ = "PRIVATE KEY"
		der, err = x509.MarshalPKCS8PrivateKey(key)
	case "sec1":
		typ = "EC PRIVATE KEY"
		der, err = x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
	case "pkcs1":
		typ = "RSA PRIVATE KEY"
		der = x509.MarshalPKCS1PrivateKey(key.(*rsa.PrivateKey))
	default:
		tb.Fatalf("unknown key format %q", format)
	}
	if err != nil {
		tb.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// writeFile writes data with exactly perm, whatever the umask.
func writeFile(tb testing.TB, path string, data []byte, perm os.FileMode) {
	tb.Helper()
	if err := os.WriteFile(path, data, perm); err != nil {
		tb.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil {
		tb.Fatal(err)
	}
}

// writeOperatorCA writes a cert bundle and key for CAConfig and returns it.
func writeOperatorCA(tb testing.TB, certPEM, keyPEM []byte, keyPerm os.FileMode) CAConfig {
	tb.Helper()
	dir := tb.TempDir()
	cfg := CAConfig{CertFile: filepath.Join(dir, "op-ca.pem"), KeyFile: filepath.Join(dir, "op-ca.key")}
	writeFile(tb, cfg.CertFile, certPEM, 0o644)
	writeFile(tb, cfg.KeyFile, keyPEM, keyPerm)
	return cfg
}

func fileMode(tb testing.TB, path string) os.FileMode {
	tb.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestCAGenerateAndReload(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	ca, err := LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow})
	if err != nil {
		t.Fatalf("LoadOrCreateCA: %v", err)
	}
	for name, want := range map[string]os.FileMode{caCertName: 0o644, caKeyName: 0o600, ".": 0o700} {
		if got := fileMode(t, filepath.Join(dir, name)); got != want {
			t.Errorf("%s mode = %04o, want %04o", name, got, want)
		}
	}

	c := ca.Cert()
	now := testNow()
	checks := []struct {
		what string
		ok   bool
	}{
		{"subject is CN=fleetmq CA,O=fleetmq", c.Subject.CommonName == "fleetmq CA" && slices.Equal(c.Subject.Organization, []string{"fleetmq"})},
		{"self-signed", c.CheckSignatureFrom(c) == nil && bytes.Equal(c.RawIssuer, c.RawSubject)},
		{"is a CA", c.BasicConstraintsValid && c.IsCA},
		{"path length zero", c.MaxPathLen == 0 && c.MaxPathLenZero},
		{"key usage", c.KeyUsage == x509.KeyUsageCertSign|x509.KeyUsageCRLSign|x509.KeyUsageDigitalSignature},
		{"subject key id", len(c.SubjectKeyId) == 20},
		{"P-256 key", c.PublicKeyAlgorithm == x509.ECDSA && c.PublicKey.(*ecdsa.PublicKey).Curve == elliptic.P256()},
		{"serial positive, at most 128 bits", c.SerialNumber.Sign() > 0 && c.SerialNumber.BitLen() <= 128 && c.SerialNumber.BitLen() > 64},
		{"NotBefore now-1h", c.NotBefore.Equal(now.Add(-time.Hour))},
		{"NotAfter now+10y", c.NotAfter.Equal(now.AddDate(10, 0, 0))},
		{"chain is the cert", len(ca.Chain()) == 1 && ca.Chain()[0] == c},
		{"fingerprint is SHA-256 of DER", ca.Fingerprint() == sha256.Sum256(c.Raw)},
		{"pool verifies the CA itself", func() bool {
			_, err := c.Verify(x509.VerifyOptions{Roots: ca.Pool(), CurrentTime: now})
			return err == nil
		}()},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("generated CA: %s: not so", ch.what)
		}
	}

	onDisk, err := os.ReadFile(filepath.Join(dir, caCertName))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk, ca.ChainPEM()) {
		t.Error("ca.pem differs from ChainPEM")
	}

	again, err := LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow})
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if again.Fingerprint() != ca.Fingerprint() {
		t.Error("reloaded CA has a different fingerprint")
	}
	// The reloaded key must be the one that signed the certificate.
	dev, err := again.IssueDevice(genP256(t).Public(), "dev1", time.Hour)
	if err != nil {
		t.Fatalf("issue with reloaded CA: %v", err)
	}
	if err := dev.CheckSignatureFrom(ca.Cert()); err != nil {
		t.Errorf("certificate from the reloaded CA does not verify: %v", err)
	}
}

func TestCAAccessorsReturnCopies(t *testing.T) {
	ca := newTestCA(t, testNow)
	ca.Chain()[0] = nil
	p := ca.ChainPEM()
	p[0] = 'X'
	if ca.Chain()[0] == nil || ca.ChainPEM()[0] != '-' {
		t.Error("a caller could modify the CA through Chain or ChainPEM")
	}
}

func TestCAHalfPresentPairRefused(t *testing.T) {
	src := t.TempDir()
	if _, err := LoadOrCreateCA(CAConfig{Dir: src, Now: testNow}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		present string // file copied into the new dir
		content func(tb testing.TB) []byte
	}{
		{name: "cert only", present: caCertName},
		{name: "key only", present: caKeyName},
		{name: "garbage cert only", present: caCertName, content: func(testing.TB) []byte { return []byte("garbage") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			data, err := os.ReadFile(filepath.Join(src, tt.present))
			if err != nil {
				t.Fatal(err)
			}
			if tt.content != nil {
				data = tt.content(t)
			}
			writeFile(t, filepath.Join(dir, tt.present), data, 0o600)
			_, err = LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow})
			if err == nil || !strings.Contains(err.Error(), "refusing") {
				t.Fatalf("err = %v, want a refusal", err)
			}
			after, err := os.ReadFile(filepath.Join(dir, tt.present))
			if err != nil || !bytes.Equal(after, data) {
				t.Errorf("%s was changed", tt.present)
			}
			if names := dirNames(t, dir); !slices.Equal(names, []string{tt.present}) {
				t.Errorf("dir holds %q, want only %s", names, tt.present)
			}
		})
	}
}

// TestCACreationInterrupted lays out what a crash during the first start
// can leave (see createCA): the next start finishes the creation when the
// certificate was written, starts afresh when it was not, and refuses a
// pending key that is not the certificate's.
func TestCACreationInterrupted(t *testing.T) {
	src := t.TempDir()
	orig, err := LoadOrCreateCA(CAConfig{Dir: src, Now: testNow})
	if err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if _, err := LoadOrCreateCA(CAConfig{Dir: other, Now: testNow}); err != nil {
		t.Fatal(err)
	}
	read := func(dir, name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	t.Run("key written, certificate not", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, caPendingKeyName), read(src, caKeyName), 0o600)
		ca, err := LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow})
		if err != nil {
			t.Fatalf("start after the crash: %v", err)
		}
		if bytes.Equal(ca.Cert().Raw, orig.Cert().Raw) {
			t.Error("a key whose certificate was never written was kept")
		}
		if names := dirNames(t, dir); !slices.Equal(names, []string{caKeyName, caCertName}) {
			t.Errorf("dir holds %q", names)
		}
	})
	t.Run("certificate written, key not renamed", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, caCertName), read(src, caCertName), 0o644)
		writeFile(t, filepath.Join(dir, caPendingKeyName), read(src, caKeyName), 0o600)
		ca, err := LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow})
		if err != nil {
			t.Fatalf("start after the crash: %v", err)
		}
		if !bytes.Equal(ca.Cert().Raw, orig.Cert().Raw) {
			t.Error("the CA whose certificate was written was not kept")
		}
		if fi, err := os.Stat(filepath.Join(dir, caKeyName)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("ca.key after finishing: %v %v", fi, err)
		}
		if names := dirNames(t, dir); !slices.Equal(names, []string{caKeyName, caCertName}) {
			t.Errorf("dir holds %q", names)
		}
	})
	t.Run("pending key of another CA", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, caCertName), read(src, caCertName), 0o644)
		writeFile(t, filepath.Join(dir, caPendingKeyName), read(other, caKeyName), 0o600)
		if _, err := LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow}); err == nil || !strings.Contains(err.Error(), "refusing") {
			t.Fatalf("err = %v, want a refusal", err)
		}
		if names := dirNames(t, dir); !slices.Equal(names, []string{caPendingKeyName, caCertName}) {
			t.Errorf("dir holds %q", names)
		}
	})
}

func TestCACorruptFilesNotOverwritten(t *testing.T) {
	src := t.TempDir()
	if _, err := LoadOrCreateCA(CAConfig{Dir: src, Now: testNow}); err != nil {
		t.Fatal(err)
	}
	goodCert, _ := os.ReadFile(filepath.Join(src, caCertName))
	goodKey, _ := os.ReadFile(filepath.Join(src, caKeyName))
	tests := []struct {
		name      string
		cert, key []byte
		want      string
	}{
		{name: "garbage cert", cert: []byte("garbage"), key: goodKey, want: "no PEM CERTIFICATE"},
		{name: "garbage key", cert: goodCert, key: []byte("garbage"), want: "no PEM private key"},
		{name: "other key", cert: goodCert, key: keyPEM(t, genP256(t), "pkcs8"), want: "does not match"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, caCertName), tt.cert, 0o644)
			writeFile(t, filepath.Join(dir, caKeyName), tt.key, 0o600)
			_, err := LoadOrCreateCA(CAConfig{Dir: dir, Now: testNow})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
			for name, want := range map[string][]byte{caCertName: tt.cert, caKeyName: tt.key} {
				if got, _ := os.ReadFile(filepath.Join(dir, name)); !bytes.Equal(got, want) {
					t.Errorf("%s was overwritten", name)
				}
			}
		})
	}
}

func TestCAOperatorProvided(t *testing.T) {
	now := testNow()
	root := newRoot(t, genP256(t), now, nil)
	inter := newIntermediate(t, root, genP256(t), now)
	rsaRoot := newRoot(t, genRSA(t, 2048), now, nil)
	noSKID := withoutSKID(t, root)

	tests := []struct {
		name      string
		certPEM   []byte
		keyPEM    []byte
		wantChain []*x509.Certificate
		root      *x509.Certificate // trust anchor the device cert must chain to
	}{
		{name: "root pkcs8", certPEM: certsPEM(root.cert), keyPEM: keyPEM(t, root.key, "pkcs8"), wantChain: []*x509.Certificate{root.cert}, root: root.cert},
		{name: "root sec1", certPEM: certsPEM(root.cert), keyPEM: keyPEM(t, root.key, "sec1"), wantChain: []*x509.Certificate{root.cert}, root: root.cert},
		{name: "root sec1 with ec parameters", certPEM: certsPEM(root.cert),
			keyPEM:    append(pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}}), keyPEM(t, root.key, "sec1")...),
			wantChain: []*x509.Certificate{root.cert}, root: root.cert},
		{name: "rsa root pkcs1", certPEM: certsPEM(rsaRoot.cert), keyPEM: keyPEM(t, rsaRoot.key, "pkcs1"), wantChain: []*x509.Certificate{rsaRoot.cert}, root: rsaRoot.cert},
		{name: "intermediate", certPEM: certsPEM(inter.cert, root.cert), keyPEM: keyPEM(t, inter.key, "pkcs8"), wantChain: []*x509.Certificate{inter.cert, root.cert}, root: root.cert},
		{name: "intermediate without root", certPEM: certsPEM(inter.cert), keyPEM: keyPEM(t, inter.key, "pkcs8"), wantChain: []*x509.Certificate{inter.cert}, root: root.cert},
		{name: "root without subject key id", certPEM: certsPEM(noSKID.cert), keyPEM: keyPEM(t, noSKID.key, "pkcs8"), wantChain: []*x509.Certificate{noSKID.cert}, root: noSKID.cert},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := writeOperatorCA(t, tt.certPEM, tt.keyPEM, 0o600)
			cfg.Now = testNow
			ca, err := LoadOrCreateCA(cfg)
			if err != nil {
				t.Fatalf("LoadOrCreateCA: %v", err)
			}
			chain := ca.Chain()
			if !slices.EqualFunc(chain, tt.wantChain, (*x509.Certificate).Equal) {
				t.Fatalf("chain has %d certs, not the %d expected in issuing-first order", len(chain), len(tt.wantChain))
			}
			if !ca.Cert().Equal(tt.wantChain[0]) {
				t.Error("Cert is not the issuing CA")
			}
			if !bytes.Equal(ca.ChainPEM(), certsPEM(tt.wantChain...)) {
				t.Error("ChainPEM is not the chain, issuing first")
			}
			if ca.Fingerprint() != sha256.Sum256(tt.wantChain[0].Raw) {
				t.Error("fingerprint is not of the issuing CA")
			}

			dev, err := ca.IssueDevice(genP256(t).Public(), "dev1", time.Hour)
			if err != nil {
				t.Fatalf("IssueDevice: %v", err)
			}
			if len(dev.AuthorityKeyId) == 0 {
				t.Error("device certificate has no AuthorityKeyId")
			}
			roots := x509.NewCertPool()
			roots.AddCert(tt.root)
			inters := x509.NewCertPool()
			for _, c := range chain[:len(chain)-1] {
				inters.AddCert(c)
			}
			if len(chain) == 1 && !chain[0].Equal(tt.root) {
				inters.AddCert(chain[0])
			}
			opts := x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
			if _, err := dev.Verify(opts); err != nil {
				t.Errorf("device cert does not verify against the root: %v", err)
			}
			opts.Roots, opts.Intermediates = ca.Pool(), nil
			if _, err := dev.Verify(opts); err != nil {
				t.Errorf("device cert does not verify against Pool: %v", err)
			}

			crl, err := ca.CRL(nil, big.NewInt(1), time.Hour)
			if err != nil {
				t.Fatalf("CRL: %v", err)
			}
			rl, err := x509.ParseRevocationList(crl.DER)
			if err != nil {
				t.Fatal(err)
			}
			if err := rl.CheckSignatureFrom(ca.Cert()); err != nil {
				t.Errorf("CRL signature: %v", err)
			}
		})
	}
}

func TestCAIntermediateNeedsChain(t *testing.T) {
	// Shows the verification in TestCAOperatorProvided can fail: without
	// the intermediate a device certificate does not reach the root.
	now := testNow()
	root := newRoot(t, genP256(t), now, nil)
	inter := newIntermediate(t, root, genP256(t), now)
	cfg := writeOperatorCA(t, certsPEM(inter.cert, root.cert), keyPEM(t, inter.key, "pkcs8"), 0o600)
	cfg.Now = testNow
	ca, err := LoadOrCreateCA(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := ca.IssueDevice(genP256(t).Public(), "dev1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root.cert)
	if _, err := dev.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("device cert verified against the root without the intermediate")
	}
}

func TestCAOperatorProvidedRefused(t *testing.T) {
	now := testNow()
	root := newRoot(t, genP256(t), now, nil)
	inter := newIntermediate(t, root, genP256(t), now)
	expired := newRoot(t, genP256(t), now, func(c *x509.Certificate) {
		c.NotBefore, c.NotAfter = now.AddDate(-2, 0, 0), now.Add(-time.Minute)
	})
	noCertSign := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature })
	expiredRoot := newRoot(t, genP256(t), now, func(c *x509.Certificate) {
		c.NotBefore, c.NotAfter = now.AddDate(-2, 0, 0), now.Add(-time.Minute)
	})
	underExpired := newIntermediate(t, expiredRoot, genP256(t), now)
	future := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.NotBefore = now.Add(2 * time.Hour) })
	futureRoot := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.NotBefore = now.Add(2 * time.Hour) })
	underFuture := newIntermediate(t, futureRoot, genP256(t), now)
	serverOnly := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} })
	pathLenZero := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.MaxPathLen, c.MaxPathLenZero = 0, true })
	belowPathLen := newIntermediate(t, pathLenZero, genP256(t), now)
	noCRLSign := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature })
	leafKey := genP256(t)
	leaf := createCert(t, &x509.Certificate{
		SerialNumber: big.NewInt(9), Subject: pkix.Name{CommonName: "leaf"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true,
	}, root.cert, leafKey.Public(), root.key)
	encrypted := pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1, 2, 3}})

	tests := []struct {
		name    string
		certPEM []byte
		keyPEM  []byte
		keyPerm os.FileMode
		want    string
	}{
		{name: "mismatched key", certPEM: certsPEM(root.cert), keyPEM: keyPEM(t, inter.key, "pkcs8"), keyPerm: 0o600, want: "does not match"},
		{name: "world-readable key", certPEM: certsPEM(root.cert), keyPEM: keyPEM(t, root.key, "pkcs8"), keyPerm: 0o604, want: "chmod 600"},
		{name: "group-readable key", certPEM: certsPEM(root.cert), keyPEM: keyPEM(t, root.key, "pkcs8"), keyPerm: 0o640, want: "chmod 600"},
		{name: "0644 key", certPEM: certsPEM(root.cert), keyPEM: keyPEM(t, root.key, "pkcs8"), keyPerm: 0o644, want: "accessible by group or others"},
		{name: "non-CA cert", certPEM: certsPEM(leaf), keyPEM: keyPEM(t, leafKey, "pkcs8"), keyPerm: 0o600, want: "not a CA"},
		{name: "no keyCertSign", certPEM: certsPEM(noCertSign.cert), keyPEM: keyPEM(t, noCertSign.key, "pkcs8"), keyPerm: 0o600, want: "keyCertSign"},
		{name: "expired root in chain", certPEM: certsPEM(underExpired.cert, expiredRoot.cert), keyPEM: keyPEM(t, underExpired.key, "pkcs8"), keyPerm: 0o600,
			want: "certificate 2 of the chain (CN=operator root,O=operator) expired"},
		{name: "not yet valid", certPEM: certsPEM(future.cert), keyPEM: keyPEM(t, future.key, "pkcs8"), keyPerm: 0o600, want: "is not valid before 2026-03-01T14:00:00Z, and the clock says 2026-03-01T12:00:00Z"},
		{name: "root not yet valid", certPEM: certsPEM(underFuture.cert, futureRoot.cert), keyPEM: keyPEM(t, underFuture.key, "pkcs8"), keyPerm: 0o600,
			want: "certificate 2 of the chain (CN=operator root,O=operator) is not valid before"},
		{name: "no clientAuth", certPEM: certsPEM(serverOnly.cert), keyPEM: keyPEM(t, serverOnly.key, "pkcs8"), keyPerm: 0o600,
			want: "extended key usage does not allow device (TLS client) certificates"},
		{name: "path length", certPEM: certsPEM(belowPathLen.cert, pathLenZero.cert), keyPEM: keyPEM(t, belowPathLen.key, "pkcs8"), keyPerm: 0o600,
			want: "path length constraint in the CA chain"},
		{name: "no cRLSign", certPEM: certsPEM(noCRLSign.cert), keyPEM: keyPEM(t, noCRLSign.key, "pkcs8"), keyPerm: 0o600, want: "cRLSign missing"},
		{name: "expired", certPEM: certsPEM(expired.cert), keyPEM: keyPEM(t, expired.key, "pkcs8"), keyPerm: 0o600, want: "expired"},
		{name: "root first, with the intermediate's key", certPEM: certsPEM(root.cert, inter.cert), keyPEM: keyPEM(t, inter.key, "pkcs8"), keyPerm: 0o600,
			want: "the private key is that of certificate 2 (CN=operator intermediate,O=operator), not of the first: order the file issuing CA first"},
		{name: "root first", certPEM: certsPEM(root.cert, inter.cert), keyPEM: keyPEM(t, root.key, "pkcs8"), keyPerm: 0o600, want: "not signed by"},
		{name: "unrelated second cert", certPEM: certsPEM(inter.cert, expired.cert), keyPEM: keyPEM(t, inter.key, "pkcs8"), keyPerm: 0o600, want: "not signed by"},
		{name: "encrypted key", certPEM: certsPEM(root.cert), keyPEM: encrypted, keyPerm: 0o600, want: "encrypted"},
		{name: "key in cert file", certPEM: append(certsPEM(root.cert), keyPEM(t, root.key, "pkcs8")...), keyPEM: keyPEM(t, root.key, "pkcs8"), keyPerm: 0o600, want: "only CERTIFICATE"},
		{name: "cert in key file", certPEM: certsPEM(root.cert), keyPEM: certsPEM(root.cert), keyPerm: 0o600, want: "unexpected PEM block"},
		{name: "empty cert file", certPEM: nil, keyPEM: keyPEM(t, root.key, "pkcs8"), keyPerm: 0o600, want: "no PEM CERTIFICATE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := writeOperatorCA(t, tt.certPEM, tt.keyPEM, tt.keyPerm)
			cfg.Now = testNow
			cfg.Dir = t.TempDir() // must be ignored when files are given
			_, err := LoadOrCreateCA(cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
			if got := fileMode(t, cfg.KeyFile); got != tt.keyPerm {
				t.Errorf("key file mode changed to %04o", got)
			}
			if names := dirNames(t, cfg.Dir); len(names) != 0 {
				t.Errorf("data dir holds %q; a CA was generated although files were given", names)
			}
		})
	}
}

// TestCAWithoutCRLSignOfAServedFleet: a CA without cRLSign is refused for a
// new fleet, but one a fleet was served with before that was checked keeps
// working (an upgrade must not stop the fleet over its CRL): it issues, and
// says it cannot sign the CRL.
func TestCAWithoutCRLSignOfAServedFleet(t *testing.T) {
	now := testNow()
	noCRLSign := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature })
	cfg := writeOperatorCA(t, certsPEM(noCRLSign.cert), keyPEM(t, noCRLSign.key, "pkcs8"), 0o600)
	cfg.Now = testNow
	if _, err := LoadOrCreateCA(cfg); err == nil || !strings.Contains(err.Error(), "cRLSign missing") {
		t.Fatalf("a new fleet's CA without cRLSign: %v", err)
	}
	cfg.MustExist = true
	ca, err := LoadOrCreateCA(cfg)
	if err != nil {
		t.Fatalf("a served fleet's CA without cRLSign: %v", err)
	}
	if ca.SignsCRLs() {
		t.Error("SignsCRLs = true without cRLSign")
	}
	if _, err := ca.IssueDevice(genP256(t).Public(), "pi-1", time.Hour); err != nil {
		t.Errorf("IssueDevice: %v", err)
	}
	if _, err := ca.CRL(nil, big.NewInt(1), time.Hour); err == nil {
		t.Error("a CRL was signed without cRLSign")
	}
	root := newRoot(t, genP256(t), now, nil)
	cfg = writeOperatorCA(t, certsPEM(root.cert), keyPEM(t, root.key, "pkcs8"), 0o600)
	cfg.Now = testNow
	if ca, err := LoadOrCreateCA(cfg); err != nil || !ca.SignsCRLs() {
		t.Errorf("a CA with cRLSign: SignsCRLs false or %v", err)
	}
}

func TestCAConfigRefused(t *testing.T) {
	tests := []struct {
		name string
		cfg  CAConfig
	}{
		{name: "nothing", cfg: CAConfig{}},
		{name: "cert file only", cfg: CAConfig{CertFile: "ca.pem", Dir: "x"}},
		{name: "key file only", cfg: CAConfig{KeyFile: "ca.key", Dir: "x"}},
		{name: "missing files", cfg: CAConfig{CertFile: "/nonexistent/ca.pem", KeyFile: "/nonexistent/ca.key"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if ca, err := LoadOrCreateCA(tt.cfg); err == nil {
				t.Fatalf("LoadOrCreateCA succeeded with fingerprint %x", ca.Fingerprint())
			}
		})
	}
}

// csrWithSANs asks for everything a device must not get.
func csrWithSANs(tb testing.TB, key crypto.Signer) *x509.CertificateRequest {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: "admin", Organization: []string{"evil"}, Country: []string{"XX"}},
		DNSNames:       []string{"broker.example.com", "localhost"},
		IPAddresses:    []net.IP{net.IPv4(127, 0, 0, 1)},
		EmailAddresses: []string{"root@example.com"},
	}, key)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := ParseCSR(der)
	if err != nil {
		tb.Fatal(err)
	}
	return csr
}

func TestIssueDeviceFields(t *testing.T) {
	ca := newTestCA(t, testNow)
	now := testNow()
	_, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		key  crypto.Signer
	}{
		{"p256", genP256(t)},
		{"p384", p384},
		{"ed25519", edPriv},
		{"rsa2048", genRSA(t, 2048)},
	}
	wantExt := []string{"2.5.29.15", "2.5.29.19", "2.5.29.35", "2.5.29.37"} // KU, BC, AKID, EKU
	seen := map[string]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			csr := csrWithSANs(t, tt.key)
			c, err := ca.IssueDevice(csr.PublicKey, "pi-kitchen.1", 24*time.Hour)
			if err != nil {
				t.Fatalf("IssueDevice: %v", err)
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
				{"subject is CN only", c.Subject.String() == "CN=pi-kitchen.1" && len(c.Subject.Names) == 1},
				{"no SANs", len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses)+len(c.URIs) == 0},
				{"only KU, BC, AKID and EKU extensions", slices.Equal(exts, wantExt)},
				{"EKU client auth only", slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) && len(c.UnknownExtKeyUsage) == 0},
				{"KU digital signature only", c.KeyUsage == x509.KeyUsageDigitalSignature},
				{"not a CA", c.BasicConstraintsValid && !c.IsCA},
				{"AKID is the CA's SKID", bytes.Equal(c.AuthorityKeyId, ca.Cert().SubjectKeyId)},
				{"serial positive and ~128 bits", c.SerialNumber.Sign() > 0 && c.SerialNumber.BitLen() <= 128 && c.SerialNumber.BitLen() > 64},
				{"backdated 5 minutes", c.NotBefore.Equal(now.Add(-5 * time.Minute))},
				{"NotAfter now+lifetime", c.NotAfter.Equal(now.Add(24 * time.Hour))},
				{"issuer is the CA", bytes.Equal(c.RawIssuer, ca.Cert().RawSubject)},
				{"public key is the CSR's", tt.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(c.PublicKey)},
			}
			for _, ch := range checks {
				if !ch.ok {
					t.Errorf("%s: not so", ch.what)
				}
			}
			if seen[SerialHex(c.SerialNumber)] {
				t.Error("serial repeated")
			}
			seen[SerialHex(c.SerialNumber)] = true

			opts := x509.VerifyOptions{Roots: ca.Pool(), CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
			if _, err := c.Verify(opts); err != nil {
				t.Errorf("does not verify for client auth: %v", err)
			}
			opts.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			if _, err := c.Verify(opts); err == nil {
				t.Error("device cert verifies for server auth")
			}
			opts.KeyUsages, opts.CurrentTime = nil, now.Add(-6*time.Minute)
			if _, err := c.Verify(opts); err == nil {
				t.Error("device cert valid more than 5 minutes before issue")
			}
		})
	}
}

func TestIssueDeviceRefused(t *testing.T) {
	ca := newTestCA(t, testNow)
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	x, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		pub      crypto.PublicKey
		id       string
		lifetime time.Duration
		code     Code // empty: any error
	}{
		{name: "p224", pub: p224.Public(), id: "dev", lifetime: time.Hour, code: CodeKeyUnsupported},
		{name: "x25519", pub: x.PublicKey(), id: "dev", lifetime: time.Hour, code: CodeKeyUnsupported},
		{name: "nil key", pub: nil, id: "dev", lifetime: time.Hour, code: CodeKeyUnsupported},
		{name: "bad id", pub: genP256(t).Public(), id: "Dev/1", lifetime: time.Hour, code: CodeIDInvalid},
		{name: "zero lifetime", pub: genP256(t).Public(), id: "dev", lifetime: 0},
		{name: "negative lifetime", pub: genP256(t).Public(), id: "dev", lifetime: -time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ca.IssueDevice(tt.pub, tt.id, tt.lifetime)
			if err == nil {
				t.Fatalf("IssueDevice issued serial %s", SerialHex(c.SerialNumber))
			}
			if tt.code == "" {
				return
			}
			var e *Error
			if !errors.As(err, &e) || e.Code != tt.code {
				t.Errorf("err = %v, want code %s", err, tt.code)
			}
		})
	}
}

func TestIssueDeviceCappedAtCAExpiry(t *testing.T) {
	clock := &testClock{t: testNow()}
	ca := newTestCA(t, clock.Now)
	caEnd := ca.Cert().NotAfter
	pub := genP256(t).Public()

	long, err := ca.IssueDevice(pub, "dev", 11*365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !long.NotAfter.Equal(caEnd) {
		t.Errorf("NotAfter = %s, want the CA's %s", long.NotAfter, caEnd)
	}

	clock.t = caEnd.Add(-time.Hour)
	late, err := ca.IssueDevice(pub, "dev", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !late.NotAfter.Equal(caEnd) {
		t.Errorf("NotAfter = %s, want the CA's %s", late.NotAfter, caEnd)
	}

	clock.t = caEnd.Add(time.Second)
	if _, err := ca.IssueDevice(pub, "dev", time.Hour); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("issuing after CA expiry: err = %v, want expired", err)
	}
}

// verifyUpTo verifies c through inter up to root at time at.
func verifyUpTo(c, root, inter *x509.Certificate, at time.Time) error {
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inters := x509.NewCertPool()
	inters.AddCert(inter)
	_, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

// TestIssueCappedAtChainEnd: a root that expires before the intermediate
// under it ends the chain for clients that verify up to the root (OpenSSL's:
// mosquitto, curl): nothing is issued past it.
func TestIssueCappedAtChainEnd(t *testing.T) {
	now := testNow()
	rootEnd := now.AddDate(0, 0, 10)
	root := newRoot(t, genP256(t), now, func(c *x509.Certificate) { c.NotAfter = rootEnd })
	inter := newIntermediate(t, root, genP256(t), now) // ends in two years
	cfg := writeOperatorCA(t, certsPEM(inter.cert, root.cert), keyPEM(t, inter.key, "pkcs8"), 0o600)
	clock := &testClock{t: now}
	cfg.Now = clock.Now
	ca, err := LoadOrCreateCA(cfg)
	if err != nil {
		t.Fatalf("LoadOrCreateCA: %v", err)
	}
	dev, err := ca.IssueDevice(genP256(t).Public(), "pi-1", 30*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.IssueServer(nil, 30*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*x509.Certificate{dev, srv.Leaf} {
		// At its NotAfter it must still verify up to the root.
		if err := verifyUpTo(c, root.cert, inter.cert, c.NotAfter); err != nil || !c.NotAfter.Equal(rootEnd) {
			t.Errorf("%s: NotAfter = %s, want the root's %s (verified up to the root then: %v)", c.Subject.CommonName, c.NotAfter, rootEnd, err)
		}
	}
	clock.t = rootEnd
	if _, err := ca.IssueDevice(genP256(t).Public(), "pi-1", time.Hour); err == nil || !strings.Contains(err.Error(), "the CA chain expired") {
		t.Errorf("issuing once the root expired: err = %v, want the CA chain expired", err)
	}
	// A clock set back before the chain's start after loading.
	clock.t = now.AddDate(-1, 0, 0)
	if _, err := ca.IssueDevice(genP256(t).Public(), "pi-1", time.Hour); err == nil || !strings.Contains(err.Error(), "set the clock") {
		t.Errorf("issuing with the clock before the chain: err = %v, want set the clock", err)
	}
}

// TestIssueNotBeforeWithinCA: an operator CA made a minute before the
// server issues is younger than the backdate. Its certificates start with
// the chain, never before it: one that starts earlier verifies at no time
// in its first minutes, and the device agent checks it at its start.
func TestIssueNotBeforeWithinCA(t *testing.T) {
	now := testNow()
	root := newRoot(t, genP256(t), now, nil) // started an hour ago
	inter := newIntermediate(t, root, genP256(t), now)
	young := now.Add(-time.Minute)
	tmpl := caTemplate("operator intermediate", now, 3)
	tmpl.NotBefore = young
	tmpl.MaxPathLenZero = true
	inter = testCert{createCert(t, tmpl, root.cert, inter.key.Public(), root.key), inter.key}
	cfg := writeOperatorCA(t, certsPEM(inter.cert, root.cert), keyPEM(t, inter.key, "pkcs8"), 0o600)
	cfg.Now = testNow
	ca, err := LoadOrCreateCA(cfg)
	if err != nil {
		t.Fatalf("LoadOrCreateCA: %v", err)
	}
	dev, err := ca.IssueDevice(genP256(t).Public(), "pi-young", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.IssueServer(nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*x509.Certificate{dev, srv.Leaf} {
		if !c.NotBefore.Equal(young) {
			t.Errorf("%s: NotBefore = %s, want the CA's start %s", c.Subject.CommonName, c.NotBefore, young)
		}
		if err := verifyUpTo(c, root.cert, inter.cert, c.NotBefore); err != nil {
			t.Errorf("%s does not verify at its NotBefore: %v", c.Subject.CommonName, err)
		}
	}
	// The CA started a minute before issuing: in the backdate.
	if from, to := ca.issuedBetween(dev); !from.Equal(young) || !to.Equal(young.Add(backdate)) {
		t.Errorf("issuedBetween = %s..%s, want %s..%s", from, to, young, young.Add(backdate))
	}

	// A CA older than the backdate backdates fully; the issue time is then
	// exact.
	later := now.Add(time.Hour)
	cfg.Now = func() time.Time { return later }
	if ca, err = LoadOrCreateCA(cfg); err != nil {
		t.Fatal(err)
	}
	if dev, err = ca.IssueDevice(genP256(t).Public(), "pi-young", time.Hour); err != nil {
		t.Fatal(err)
	}
	if !dev.NotBefore.Equal(later.Add(-backdate)) {
		t.Errorf("NotBefore = %s, want %s", dev.NotBefore, later.Add(-backdate))
	}
	if from, to := ca.issuedBetween(dev); !from.Equal(later) || !to.Equal(later) {
		t.Errorf("issuedBetween = %s..%s, want %s", from, to, later)
	}
}

func TestIssueServer(t *testing.T) {
	ca := newTestCA(t, testNow)
	now := testNow()
	tests := []struct {
		name    string
		hosts   []string
		cn      string
		dns     []string
		ips     []string
		verify  []string
		reject  []string
		wantErr bool
	}{
		{
			name:   "defaults only",
			hosts:  nil,
			cn:     "fleetmq",
			dns:    []string{"localhost"},
			ips:    []string{"127.0.0.1", "::1"},
			verify: []string{"localhost", "127.0.0.1", "::1"},
			reject: []string{"example.com", "10.0.0.1"},
		},
		{
			name:   "hosts with duplicates",
			hosts:  []string{"broker.example.com", "10.0.0.5", "", "BROKER.example.com", "localhost", "::1", "0:0:0:0:0:0:0:1", "*.fleet.example.com"},
			cn:     "broker.example.com",
			dns:    []string{"broker.example.com", "localhost", "*.fleet.example.com"},
			ips:    []string{"10.0.0.5", "::1", "127.0.0.1"},
			verify: []string{"broker.example.com", "10.0.0.5", "localhost", "127.0.0.1", "::1", "a.fleet.example.com"},
			reject: []string{"other.example.com", "10.0.0.6"},
		},
		{
			name:  "ip first",
			hosts: []string{"192.168.1.10"},
			cn:    "192.168.1.10",
			dns:   []string{"localhost"},
			ips:   []string{"192.168.1.10", "127.0.0.1", "::1"},
		},
		{name: "host with port", hosts: []string{"broker.example.com:8883"}, wantErr: true},
		{name: "url", hosts: []string{"https://broker.example.com"}, wantErr: true},
		{name: "space", hosts: []string{"broker example"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tc, err := ca.IssueServer(tt.hosts, 24*time.Hour)
			if tt.wantErr {
				if err == nil {
					t.Fatal("IssueServer succeeded, want an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("IssueServer: %v", err)
			}
			leaf := tc.Leaf
			if leaf == nil {
				t.Fatal("Leaf not set")
			}
			if len(tc.Certificate) != 1+len(ca.Chain()) || !bytes.Equal(tc.Certificate[0], leaf.Raw) || !bytes.Equal(tc.Certificate[1], ca.Cert().Raw) {
				t.Error("Certificate is not leaf + CA chain")
			}
			priv, ok := tc.PrivateKey.(*ecdsa.PrivateKey)
			if !ok || priv.Curve != elliptic.P256() || !priv.PublicKey.Equal(leaf.PublicKey) {
				t.Error("private key is not the P-256 key of the leaf")
			}
			var ips []string
			for _, ip := range leaf.IPAddresses {
				ips = append(ips, ip.String())
			}
			checks := []struct {
				what string
				ok   bool
			}{
				{"CN", leaf.Subject.CommonName == tt.cn},
				{"DNS SANs " + strings.Join(leaf.DNSNames, ","), slices.Equal(leaf.DNSNames, tt.dns)},
				{"IP SANs " + strings.Join(ips, ","), slices.Equal(ips, tt.ips)},
				{"EKU server auth only", slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})},
				{"KU digital signature", leaf.KeyUsage == x509.KeyUsageDigitalSignature},
				{"not a CA", !leaf.IsCA},
				{"backdated 5 minutes", leaf.NotBefore.Equal(now.Add(-5 * time.Minute))},
				{"NotAfter", leaf.NotAfter.Equal(now.Add(24 * time.Hour))},
			}
			for _, ch := range checks {
				if !ch.ok {
					t.Errorf("%s: not so", ch.what)
				}
			}
			for _, name := range tt.verify {
				if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: name, CurrentTime: now}); err != nil {
					t.Errorf("does not verify for %s: %v", name, err)
				}
			}
			for _, name := range tt.reject {
				if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: name, CurrentTime: now}); err == nil {
					t.Errorf("verifies for %s", name)
				}
			}
		})
	}
}

// handshake runs a TLS handshake over loopback TCP and returns the client's
// error. TCP rather than net.Pipe: with an unbuffered pipe, a client that
// rejects the server blocks writing its alert while the server blocks writing
// the rest of its flight.
// TestIssueServerChainConstraints: a server certificate a client holding
// the CA chain would refuse is never issued. Loopback names the CA may not
// issue for are left out; a host it may not issue for, or a CA that may not
// issue servers at all, is an error.
func TestIssueServerChainConstraints(t *testing.T) {
	now := time.Now().Truncate(time.Second) // the handshakes verify at the real time
	operatorCA := func(t *testing.T, mutate func(*x509.Certificate)) (*CA, *x509.CertPool) {
		t.Helper()
		root := newRoot(t, genP256(t), now, mutate)
		cfg := writeOperatorCA(t, certsPEM(root.cert), keyPEM(t, root.key, "pkcs8"), 0o600)
		cfg.Now = func() time.Time { return now }
		ca, err := LoadOrCreateCA(cfg)
		if err != nil {
			t.Fatalf("LoadOrCreateCA: %v", err)
		}
		return ca, ca.Pool()
	}
	dnsOnly := func(c *x509.Certificate) { c.PermittedDNSDomains = []string{"example.com"} }
	dnsAndIP := func(c *x509.Certificate) {
		c.PermittedDNSDomains = []string{"example.com"}
		c.PermittedIPRanges = []*net.IPNet{{IP: net.IPv4(10, 0, 0, 0).To4(), Mask: net.CIDRMask(8, 32)}}
	}
	tests := []struct {
		name    string
		mutate  func(*x509.Certificate)
		hosts   []string
		dns     []string
		ips     []string
		wantErr string
	}{
		{name: "dns constrained", mutate: dnsOnly, hosts: []string{"mqtt.example.com"},
			dns: []string{"mqtt.example.com"}, ips: []string{"127.0.0.1", "::1"}},
		{name: "dns constrained, loopback addresses only", mutate: dnsOnly, ips: []string{"127.0.0.1", "::1"}},
		{name: "host outside the constraints", mutate: dnsOnly, hosts: []string{"mqtt.example.org"}, wantErr: `name constraints do not permit a name of the server certificate`},
		{name: "ip constrained", mutate: dnsAndIP, hosts: []string{"10.1.2.3", "mqtt.example.com"},
			dns: []string{"mqtt.example.com"}, ips: []string{"10.1.2.3"}},
		{name: "no loopback name permitted", mutate: dnsAndIP, wantErr: "permit none of localhost, 127.0.0.1 and ::1"},
		{name: "client only", mutate: func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} },
			wantErr: "does not allow server certificates"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ca, roots := operatorCA(t, tt.mutate)
			tc, err := ca.IssueServer(tt.hosts, 24*time.Hour)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("IssueServer: %v", err)
			}
			var ips []string
			for _, ip := range tc.Leaf.IPAddresses {
				ips = append(ips, ip.String())
			}
			if !slices.Equal(tc.Leaf.DNSNames, tt.dns) || !slices.Equal(ips, tt.ips) {
				t.Errorf("SANs = %q %q, want %q %q", tc.Leaf.DNSNames, ips, tt.dns, tt.ips)
			}
			for _, name := range append(slices.Clone(tt.dns), tt.ips...) {
				if err := handshake(t, tc, roots, name); err != nil {
					t.Errorf("handshake for %s: %v", name, err)
				}
			}
		})
	}
}

func handshake(tb testing.TB, server tls.Certificate, roots *x509.CertPool, serverName string) error {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	deadline := time.Now().Add(30 * time.Second)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		srv := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{server}, MinVersion: tls.VersionTLS13})
		_ = srv.Handshake() // fails too when the client rejects the server
	}()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 30*time.Second)
	if err != nil {
		tb.Fatal(err)
	}
	_ = c.SetDeadline(deadline)
	cli := tls.Client(c, &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS13})
	err = cli.Handshake()
	_ = cli.Close()
	<-done
	return err
}

func TestIssueServerTLSHandshake(t *testing.T) {
	// Real clock: crypto/tls verifies against time.Now.
	root := newRoot(t, genP256(t), time.Now(), nil)
	inter := newIntermediate(t, root, genP256(t), time.Now())
	cfg := writeOperatorCA(t, certsPEM(inter.cert, root.cert), keyPEM(t, inter.key, "pkcs8"), 0o600)
	opCA, err := LoadOrCreateCA(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ownCA := newTestCA(t, nil)
	rootPool := x509.NewCertPool()
	rootPool.AddCert(root.cert)

	tests := []struct {
		name       string
		ca         *CA
		roots      *x509.CertPool
		serverName string
		ok         bool
	}{
		{"own CA localhost", ownCA, ownCA.Pool(), "localhost", true},
		{"own CA 127.0.0.1", ownCA, ownCA.Pool(), "127.0.0.1", true},
		{"own CA ::1", ownCA, ownCA.Pool(), "::1", true},
		{"own CA wrong name", ownCA, ownCA.Pool(), "example.com", false},
		{"own CA untrusted", ownCA, rootPool, "localhost", false},
		{"intermediate sent in chain", opCA, rootPool, "localhost", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cert, err := tt.ca.IssueServer(nil, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			err = handshake(t, cert, tt.roots, tt.serverName)
			if (err == nil) != tt.ok {
				t.Errorf("handshake err = %v, want success %v", err, tt.ok)
			}
		})
	}
}

func TestCRL(t *testing.T) {
	// A fraction of a second, which the CRL's dates do not encode.
	clock := &testClock{t: testNow().Add(700 * time.Millisecond)}
	ca := newTestCA(t, clock.Now)
	now := testNow()
	issue := func(tb testing.TB) *x509.Certificate {
		tb.Helper()
		c, err := ca.IssueDevice(genP256(tb).Public(), "dev", time.Hour)
		if err != nil {
			tb.Fatal(err)
		}
		return c
	}
	a, b := issue(t), issue(t)
	revokedAt := now.Add(-10 * time.Minute)
	revoked := []store.Revocation{
		{Serial: SerialHex(a.SerialNumber), NotAfter: a.NotAfter, RevokedAt: revokedAt},
		{Serial: SerialHex(b.SerialNumber), NotAfter: b.NotAfter, RevokedAt: revokedAt.Add(time.Minute)},
		{Serial: "abc", NotAfter: now.Add(-23 * time.Hour), RevokedAt: now.Add(-30 * time.Hour)}, // expired recently: kept
		{Serial: "def", NotAfter: now.Add(-25 * time.Hour), RevokedAt: now.Add(-30 * time.Hour)}, // expired long ago: may go
		{Serial: "1", NotAfter: time.Time{}, RevokedAt: now.Add(-time.Hour)},                     // unknown expiry: kept
	}
	want := map[string]time.Time{
		SerialHex(a.SerialNumber): revokedAt,
		SerialHex(b.SerialNumber): revokedAt.Add(time.Minute),
		"abc":                     now.Add(-30 * time.Hour),
		"1":                       now.Add(-time.Hour),
	}

	signed, err := ca.CRL(revoked, big.NewInt(42), 6*time.Hour)
	if err != nil {
		t.Fatalf("CRL: %v", err)
	}
	rl, err := x509.ParseRevocationList(signed.DER)
	if err != nil {
		t.Fatalf("ParseRevocationList: %v", err)
	}
	// The handler serves by the dates returned, without parsing.
	if !signed.ThisUpdate.Equal(rl.ThisUpdate) || !signed.NextUpdate.Equal(rl.NextUpdate) {
		t.Errorf("CRL returned as valid from %s to %s; it says %s to %s", signed.ThisUpdate, signed.NextUpdate, rl.ThisUpdate, rl.NextUpdate)
	}
	if err := rl.CheckSignatureFrom(ca.Cert()); err != nil {
		t.Errorf("CRL signature does not verify against the CA: %v", err)
	}
	if err := rl.CheckSignatureFrom(newTestCA(t, testNow).Cert()); err == nil {
		t.Error("CRL signature verifies against another CA")
	}
	if rl.Number.Cmp(big.NewInt(42)) != 0 || !rl.ThisUpdate.Equal(now) || !rl.NextUpdate.Equal(now.Add(6*time.Hour)) {
		t.Errorf("number %s, this update %s, next update %s", rl.Number, rl.ThisUpdate, rl.NextUpdate)
	}
	if !bytes.Equal(rl.RawIssuer, ca.Cert().RawSubject) || !bytes.Equal(rl.AuthorityKeyId, ca.Cert().SubjectKeyId) {
		t.Error("CRL issuer or authority key id is not the CA")
	}
	got := map[string]time.Time{}
	for _, e := range rl.RevokedCertificateEntries {
		got[SerialHex(e.SerialNumber)] = e.RevocationTime
	}
	if len(got) != len(want) {
		t.Errorf("CRL lists %d serials, want %d", len(got), len(want))
	}
	for s, at := range want {
		if g, ok := got[s]; !ok || !g.Equal(at) {
			t.Errorf("serial %s: listed %v at %s, want revoked at %s", s, ok, g, at)
		}
	}

	empty, err := ca.CRL(nil, big.NewInt(43), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if rl, err := x509.ParseRevocationList(empty.DER); err != nil || len(rl.RevokedCertificateEntries) != 0 {
		t.Errorf("empty CRL: %v, %d entries", err, len(rl.RevokedCertificateEntries))
	}
}

func TestCRLRefused(t *testing.T) {
	ca := newTestCA(t, testNow)
	now := testNow()
	ok := store.Revocation{Serial: "ab", NotAfter: now.Add(time.Hour), RevokedAt: now}
	tests := []struct {
		name   string
		certs  []store.Revocation
		number *big.Int
		next   time.Duration
	}{
		{name: "upper-case serial", certs: []store.Revocation{{Serial: "AB", RevokedAt: now}}, number: big.NewInt(1), next: time.Hour},
		{name: "leading zero", certs: []store.Revocation{{Serial: "0ab", RevokedAt: now}}, number: big.NewInt(1), next: time.Hour},
		{name: "not hex", certs: []store.Revocation{{Serial: "xyz", RevokedAt: now}}, number: big.NewInt(1), next: time.Hour},
		{name: "empty serial", certs: []store.Revocation{{Serial: "", RevokedAt: now}}, number: big.NewInt(1), next: time.Hour},
		{name: "zero serial", certs: []store.Revocation{{Serial: "0", RevokedAt: now}}, number: big.NewInt(1), next: time.Hour},
		{name: "negative serial", certs: []store.Revocation{{Serial: "-ab", RevokedAt: now}}, number: big.NewInt(1), next: time.Hour},
		{name: "not revoked", certs: []store.Revocation{ok, {Serial: "cd", NotAfter: now.Add(time.Hour)}}, number: big.NewInt(1), next: time.Hour},
		{name: "nil number", certs: []store.Revocation{ok}, number: nil, next: time.Hour},
		{name: "negative number", certs: []store.Revocation{ok}, number: big.NewInt(-1), next: time.Hour},
		{name: "zero next update", certs: []store.Revocation{ok}, number: big.NewInt(1), next: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ca.CRL(tt.certs, tt.number, tt.next); err == nil {
				t.Error("CRL succeeded, want an error")
			}
		})
	}
	if _, err := ca.CRL([]store.Revocation{ok}, big.NewInt(1), time.Hour); err != nil {
		t.Errorf("valid CRL refused: %v", err)
	}
}

func TestSerialHex(t *testing.T) {
	max128 := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 128), big.NewInt(1))
	tests := []struct {
		in   *big.Int
		want string
	}{
		{nil, ""},
		{big.NewInt(1), "1"},
		{big.NewInt(0x0f), "f"},
		{big.NewInt(0xabcdef), "abcdef"},
		{big.NewInt(0x0100), "100"},
		{max128, strings.Repeat("f", 32)},
	}
	for _, tt := range tests {
		if got := SerialHex(tt.in); got != tt.want {
			t.Errorf("SerialHex(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
	// Issued serials round-trip through the format.
	ca := newTestCA(t, testNow)
	c, err := ca.IssueDevice(genP256(t).Public(), "dev", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	back, ok := new(big.Int).SetString(SerialHex(c.SerialNumber), 16)
	if !ok || back.Cmp(c.SerialNumber) != 0 {
		t.Error("serial does not round-trip through SerialHex")
	}
}
