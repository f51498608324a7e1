package enroll

import (
	"bytes"
	"crypto"
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
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// File names of a generated CA inside CAConfig.Dir.
const (
	caCertName = "ca.pem"
	caKeyName  = "ca.key"
	// caPendingKeyName holds a generated CA key until its certificate is
	// written: a pair is created as key (pending), certificate, rename.
	caPendingKeyName = ".ca.key.pending"
)

const (
	// backdate is subtracted from NotBefore of issued certificates: a
	// Raspberry Pi has no battery-backed clock and may run a few minutes
	// behind until NTP catches up. See CA.notBefore for the limit.
	backdate = 5 * time.Minute
	// crlExpiredGrace is how long after expiry a revoked certificate still
	// appears in the CRL, for verifiers whose clock lags.
	crlExpiredGrace = 24 * time.Hour
)

// Conditions under which the CA issues nothing until its operator acts:
// neither a client's mistake nor a bug, so requests are answered 503 (see
// AsError), not 500.
var (
	// ErrCAExpired: the CA chain has ended; the operator renews the CA
	// (README: Renewing or replacing the CA).
	ErrCAExpired = errors.New("the CA chain expired")
	// ErrClockBeforeCA: the clock went back before the CA chain starts.
	ErrClockBeforeCA = errors.New("the clock is before the CA chain starts")
)

// serialLimit bounds random serials to 128 bits: unguessable, and well within
// the 20 octets RFC 5280 allows.
var serialLimit = new(big.Int).Lsh(big.NewInt(1), 128)

// CAConfig configures LoadOrCreateCA. Either Dir, or both CertFile and
// KeyFile, must be set.
type CAConfig struct {
	// Dir is the data folder; a generated CA is kept in Dir/ca.pem and
	// Dir/ca.key. Required unless CertFile and KeyFile are set; created
	// (0700) if missing.
	Dir string
	// CertFile is an operator-provided CA certificate PEM: the issuing CA
	// first, then any intermediates up to the root. Optional; set together
	// with KeyFile.
	CertFile string
	// KeyFile is the private key of the issuing CA in CertFile, PEM (PKCS#8,
	// SEC1 EC or PKCS#1 RSA, unencrypted). It must not be accessible by group
	// or others. Optional; set together with CertFile.
	KeyFile string
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// MustExist refuses to generate a CA in Dir (ErrNoCA): set when the
	// fleet already has certificates, which a new CA would not have
	// issued, or was served with its CA. Such a fleet's CA may also lack
	// key usage cRLSign, which a new fleet's is refused for: it ran before
	// that was checked, and refusing it now would stop the fleet at an
	// upgrade over its CRL alone (see SignsCRLs). Default false.
	MustExist bool
}

// ErrNoCA means there is no CA to load and none may be generated.
var ErrNoCA = errors.New("ca: no CA to load")

// CA issues device and server certificates and CRLs. It is immutable and
// safe for concurrent use.
type CA struct {
	cert     *x509.Certificate   // issuing CA
	chain    []*x509.Certificate // issuing first
	chainPEM []byte
	key      crypto.Signer
	// skid identifies the CA key in AuthorityKeyId of what it signs; it is
	// the certificate's SubjectKeyId, or computed when an operator CA has
	// none.
	skid []byte
	fp   [32]byte
	now  func() time.Time
}

// LoadOrCreateCA returns the CA described by cfg.
//
// With CertFile and KeyFile it loads the operator's CA. Otherwise it loads
// Dir/ca.pem and Dir/ca.key if both exist, and generates a new ECDSA P-256
// root CA valid for 10 years if neither does. If only one of the two exists
// it fails rather than replace a CA that devices may already trust.
//
// A loaded CA must be usable: the key must match the first certificate,
// which must be an unexpired CA allowed to sign certificates; each further
// certificate must have signed the one before it; and the key file must not
// be accessible by group or others (its mode is reported, never changed).
func LoadOrCreateCA(cfg CAConfig) (*CA, error) {
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	if cfg.CertFile != "" || cfg.KeyFile != "" {
		if cfg.CertFile == "" || cfg.KeyFile == "" {
			return nil, errors.New("ca: a CA certificate file and key file must be given together")
		}
		return loadCA(cfg.CertFile, cfg.KeyFile, now, cfg.MustExist)
	}
	if cfg.Dir == "" {
		return nil, errors.New("ca: a data directory, or a CA certificate file and key file, is required")
	}
	certPath := filepath.Join(cfg.Dir, caCertName)
	keyPath := filepath.Join(cfg.Dir, caKeyName)
	haveCert, err := fileExists(certPath)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	haveKey, err := fileExists(keyPath)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	if !haveKey {
		if haveKey, err = finishCreation(cfg.Dir, haveCert, now); err != nil {
			return nil, err
		}
	}
	switch {
	case haveCert && haveKey:
		return loadCA(certPath, keyPath, now, cfg.MustExist)
	case haveCert:
		return nil, fmt.Errorf("ca: %s exists but %s does not; refusing to generate a new CA over it: restore the missing file, or remove both to start a new CA (every device must then re-enroll)", certPath, keyPath)
	case haveKey:
		return nil, fmt.Errorf("ca: %s exists but %s does not; refusing to generate a new CA over it: restore the missing file, or remove both to start a new CA (every device must then re-enroll)", keyPath, certPath)
	}
	if cfg.MustExist {
		return nil, fmt.Errorf("%w: neither %s nor %s exists", ErrNoCA, certPath, keyPath)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("ca: create data directory: %w", err)
	}
	return createCA(certPath, keyPath, now)
}

// finishCreation completes or discards a CA creation a crash interrupted
// (see createCA), and reports whether the key is now in place. With the
// certificate written, the pending key is the CA's: it is moved in place.
// Without it, nothing was ever signed or trusted: the key is removed and a
// new pair is made.
func finishCreation(dir string, haveCert bool, now func() time.Time) (bool, error) {
	pending := filepath.Join(dir, caPendingKeyName)
	ok, err := fileExists(pending)
	if err != nil || !ok {
		return false, err
	}
	if !haveCert {
		if err := os.Remove(pending); err != nil {
			return false, fmt.Errorf("ca: remove the key of an unfinished CA creation: %w", err)
		}
		return false, nil
	}
	if _, err := loadCA(filepath.Join(dir, caCertName), pending, now, false); err != nil {
		return false, nil // not this certificate's key: the caller refuses the half pair
	}
	if err := os.Rename(pending, filepath.Join(dir, caKeyName)); err != nil {
		return false, fmt.Errorf("ca: finish an interrupted CA creation: %w", err)
	}
	if err := SyncDir(dir); err != nil {
		return false, fmt.Errorf("ca: %w", err)
	}
	return true, nil
}

func fileExists(path string) (bool, error) {
	_, err := os.Stat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("stat %s: %w", path, err)
}

func loadCA(certPath, keyPath string, now func() time.Time, served bool) (*CA, error) {
	if err := checkKeyFileMode(keyPath); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("ca: read key: %w", err)
	}
	key, err := parsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: key %s: %w", keyPath, err)
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("ca: read certificate: %w", err)
	}
	chain, err := parseCertsPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: certificate %s: %w", certPath, err)
	}
	if err := checkCAChain(chain, key, now(), served); err != nil {
		return nil, fmt.Errorf("ca: certificate %s: %w", certPath, err)
	}
	ca := newCA(chain, key, now)
	if err := ca.checkDeviceIssuance(); err != nil {
		return nil, fmt.Errorf("ca: certificate %s: %w", certPath, err)
	}
	return ca, nil
}

// checkDeviceIssuance issues a device certificate for a throwaway key and
// verifies it up to the end of the chain, as a relying party holding the
// chain would: an extended key usage, path length or name constraint in
// the chain that forbids it would otherwise let devices enroll, and use up
// their tokens, with certificates that every TLS peer refuses.
func (ca *CA) checkDeviceIssuance() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate a key: %w", err)
	}
	leaf, err := ca.IssueDevice(key.Public(), "fleetmq-check", time.Hour)
	if err != nil {
		return err
	}
	return ca.verifyIssued(leaf, x509.ExtKeyUsageClientAuth, ca.now())
}

// verifyIssued verifies leaf, which the CA just issued for usage, up to
// the last certificate of the chain at time at, and says what in the chain
// forbids it if it does not verify.
func (ca *CA) verifyIssued(leaf *x509.Certificate, usage x509.ExtKeyUsage, at time.Time) error {
	n := len(ca.chain)
	roots := x509.NewCertPool()
	roots.AddCert(ca.chain[n-1])
	inters := x509.NewCertPool()
	for _, c := range ca.chain[:n-1] {
		inters.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{usage}})
	if err == nil {
		return nil
	}
	what, eku := "device (TLS client)", "clientAuth"
	if usage == x509.ExtKeyUsageServerAuth {
		what, eku = "server", "serverAuth"
	}
	var inv x509.CertificateInvalidError
	if errors.As(err, &inv) {
		switch inv.Reason {
		case x509.IncompatibleUsage:
			return fmt.Errorf("the CA chain's extended key usage does not allow %s certificates, which fleetmq issues: issue the CA with no extended key usage, or with %s among them (%w)", what, eku, err)
		case x509.TooManyIntermediates:
			return fmt.Errorf("a path length constraint in the CA chain forbids the CA to issue certificates: issue it under an issuer whose path length allows one more CA (%w)", err)
		case x509.CANotAuthorizedForThisName:
			return fmt.Errorf("the CA chain's name constraints do not permit a name of the %s certificate: give only names the CA may issue for (%w)", what, err)
		}
	}
	return fmt.Errorf("a %s certificate the CA issues does not verify against its chain: %w", what, err)
}

// nameConstrained reports whether a certificate of the chain constrains
// the DNS names or IP addresses it may issue for.
func (ca *CA) nameConstrained() bool {
	for _, c := range ca.chain {
		if len(c.PermittedDNSDomains)+len(c.ExcludedDNSDomains)+len(c.PermittedIPRanges)+len(c.ExcludedIPRanges) > 0 {
			return true
		}
	}
	return false
}

func checkKeyFileMode(path string) error {
	if runtime.GOOS == "windows" {
		// Unix permission bits mean nothing there.
		return nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat key: %w", err)
	}
	if mode := fi.Mode().Perm(); mode&0o077 != 0 {
		return fmt.Errorf("key file %s has mode %04o and is accessible by group or others; run chmod 600 on it", path, mode)
	}
	return nil
}

func parseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q; only CERTIFICATE blocks are allowed", block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block found")
	}
	return certs, nil
}

func parsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key block found")
		}
		var key any
		var err error
		switch block.Type {
		case "EC PARAMETERS":
			// openssl ecparam -genkey writes this before the key.
			continue
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			if _, encrypted := block.Headers["Proc-Type"]; encrypted {
				return nil, errors.New("encrypted keys are not supported; decrypt it first")
			}
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("encrypted keys are not supported; decrypt it first")
		default:
			return nil, fmt.Errorf("unexpected PEM block %q; want PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY", block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", strings.ToLower(block.Type), err)
		}
		switch k := key.(type) {
		case *ecdsa.PrivateKey, *rsa.PrivateKey, ed25519.PrivateKey:
			return k.(crypto.Signer), nil
		}
		return nil, fmt.Errorf("unsupported key type %T", key)
	}
}

// checkCAChain checks that chain[0] is a CA that key can sign for, and that
// chain is in issuing-first order, so that a misordered bundle fails at start
// rather than as a broken TLS chain on every device.
func checkCAChain(chain []*x509.Certificate, key crypto.Signer, now time.Time, served bool) error {
	cert := chain[0]
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		// A bundle in root-first order is the likely mistake: say so
		// rather than have the operator doubt the key.
		for i, c := range chain[1:] {
			if ok && pub.Equal(c.PublicKey) {
				return fmt.Errorf("the private key is that of certificate %d (%s), not of the first: order the file issuing CA first, then each issuer", i+2, c.Subject)
			}
		}
		return errors.New("the private key does not match the first certificate: give the key of the issuing CA, whose certificate comes first in the file")
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return errors.New("the first certificate is not a CA certificate (basic constraints CA:TRUE missing): give the issuing CA first, or issue it with basicConstraints CA:TRUE")
	}
	if cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("the first certificate may not sign certificates (key usage keyCertSign missing): issue the CA with key usage keyCertSign and cRLSign")
	}
	// Without it every CRL fails to sign: /v1/crl would answer 503 for
	// good, and revocations would reach no relying party that reads it.
	if cert.KeyUsage&x509.KeyUsageCRLSign == 0 && !served {
		return errors.New("the first certificate may not sign CRLs (key usage cRLSign missing), and fleetmq publishes revoked certificates in a CRL: " +
			"issue the CA with key usage keyCertSign and cRLSign")
	}
	for i := 0; i+1 < len(chain); i++ {
		if err := chain[i].CheckSignatureFrom(chain[i+1]); err != nil {
			return fmt.Errorf("certificate %d is not signed by certificate %d; order the file issuing CA first, then each issuer: %w", i+1, i+2, err)
		}
	}
	return checkChainValidity(chain, now)
}

// checkChainValidity refuses a chain that is not valid at now. Clients
// that check the whole chain (OpenSSL's, as in mosquitto and curl) refuse
// everything the CA issues while any certificate of it is expired or not
// yet valid, and Go's refuse it while the issuing CA is.
func checkChainValidity(chain []*x509.Certificate, now time.Time) error {
	for i, c := range chain {
		which := "the CA certificate"
		if i > 0 {
			which = fmt.Sprintf("certificate %d of the chain (%s)", i+1, c.Subject)
		}
		if !now.Before(c.NotAfter) {
			return fmt.Errorf("%s expired at %s: devices refuse everything it issues; renew it for the same key (README.md: Renewing or replacing the CA) and give the renewed certificate",
				which, c.NotAfter.UTC().Format(time.RFC3339))
		}
		if now.Before(c.NotBefore) {
			return fmt.Errorf("%s is not valid before %s, and the clock says %s: devices would refuse everything the CA issues until then; if the clock is wrong, set it, otherwise start fleetmq once that time has passed",
				which, c.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

func createCA(certPath, keyPath string, now func() time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	skid, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	t := now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "fleetmq CA", Organization: []string{"fleetmq"}},
		NotBefore:             t.Add(-time.Hour),
		NotAfter:              t.AddDate(10, 0, 0),
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true, // devices are leaves; no intermediate below this root
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		SubjectKeyId:          skid,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("ca: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse new certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("ca: marshal key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	// Two files cannot appear at once. The key goes first under a pending
	// name, then the certificate, then the key is renamed: whatever a
	// crash leaves, the next start finishes or discards it (finishCreation)
	// instead of finding a lone key it must refuse.
	dir := filepath.Dir(keyPath)
	pending := filepath.Join(dir, caPendingKeyName)
	if err := WriteFileAtomic(pending, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	if err := WriteFileAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		// Nothing trusts this key yet.
		if rerr := os.Remove(pending); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return nil, fmt.Errorf("ca: %w", err)
	}
	if err := os.Rename(pending, keyPath); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	if err := SyncDir(dir); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	return newCA([]*x509.Certificate{cert}, key, now), nil
}

func newCA(chain []*x509.Certificate, key crypto.Signer, now func() time.Time) *CA {
	var buf bytes.Buffer
	for _, c := range chain {
		// Encoding to a bytes.Buffer cannot fail.
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	skid := chain[0].SubjectKeyId
	if len(skid) == 0 {
		// Only reachable for an operator CA without the extension, whose
		// key was already marshaled successfully when it was parsed.
		skid, _ = subjectKeyID(chain[0].PublicKey)
	}
	return &CA{
		cert:     chain[0],
		chain:    chain,
		chainPEM: buf.Bytes(),
		key:      key,
		skid:     skid,
		fp:       sha256.Sum256(chain[0].Raw),
		now:      now,
	}
}

// subjectKeyID is method 1 of RFC 7093: the leftmost 160 bits of the
// SHA-256 of the subjectPublicKey bit string.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	var info struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(spki, &info); err != nil {
		return nil, fmt.Errorf("parse public key: %w", err)
	}
	sum := sha256.Sum256(info.PublicKey.Bytes)
	return sum[:20], nil
}

// randomSerial returns a uniformly random serial in [1, 2^128).
func randomSerial() (*big.Int, error) {
	for {
		n, err := rand.Int(rand.Reader, serialLimit)
		if err != nil {
			return nil, fmt.Errorf("generate serial: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

// SerialHex formats a certificate serial as lowercase hex without leading
// zeros. It is the one serial format used in the store, the API, logs and
// CRL lookups. A nil serial formats as "".
func SerialHex(n *big.Int) string {
	if n == nil {
		return ""
	}
	return n.Text(16)
}

// Cert returns the issuing CA certificate.
func (ca *CA) Cert() *x509.Certificate { return ca.cert }

// Chain returns the CA certificates, issuing CA first.
func (ca *CA) Chain() []*x509.Certificate {
	return append([]*x509.Certificate(nil), ca.chain...)
}

// ChainPEM returns Chain as a PEM bundle, issuing CA first.
func (ca *CA) ChainPEM() []byte { return bytes.Clone(ca.chainPEM) }

// Pool returns a new pool holding only the issuing CA: devices are verified
// against the CA that issued them, not against a root that may also sign for
// other systems.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// Fingerprint returns the SHA-256 of the issuing CA certificate DER, the
// value carried in bootstrap tokens.
func (ca *CA) Fingerprint() [32]byte { return ca.fp }

// KeyID identifies the CA's key: the SHA-256 of its public key, hex. It
// stays the same when an operator re-issues their CA certificate for the
// same key, which keeps every certificate it signed valid.
func (ca *CA) KeyID() string {
	sum := sha256.Sum256(ca.cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// IssueDevice issues a client certificate for the device id with public key
// pub. The certificate names the device in its CN and nothing else: a CSR's
// requested subject, SANs and extensions are never copied. NotAfter is
// capped at the CA's own NotAfter. Key and id errors are *Error values.
func (ca *CA) IssueDevice(pub crypto.PublicKey, id string, lifetime time.Duration) (*x509.Certificate, error) {
	if err := CheckKey(pub); err != nil {
		return nil, err
	}
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	now := ca.now()
	notAfter, err := ca.notAfter(now, lifetime)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("issue device certificate: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: id},
		NotBefore:             ca.notBefore(now),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		AuthorityKeyId:        ca.skid,
	}
	return ca.sign(tmpl, pub)
}

// IssueServer issues a TLS server certificate with a fresh ECDSA P-256 key
// for hosts (IP addresses or DNS names), plus localhost, 127.0.0.1 and ::1 so
// that local tools always verify. Certificate holds the leaf and Chain.
//
// A CA whose name constraints exclude one of the loopback names issues
// without it: a single name it may not issue for makes clients refuse the
// whole certificate. A host it may not issue for is an error.
func (ca *CA) IssueServer(hosts []string, lifetime time.Duration) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue server certificate: generate key: %w", err)
	}
	now := ca.now()
	notAfter, err := ca.notAfter(now, lifetime)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue server certificate: %w", err)
	}
	var dnsNames []string
	var ips []net.IP
	seen := make(map[string]bool)
	cn := "fleetmq"
	for _, h := range hosts {
		if h != "" {
			cn = h
			break
		}
	}
	loopback := []string{"localhost", "127.0.0.1", "::1"}
	if ca.nameConstrained() {
		loopback = slices.DeleteFunc(loopback, func(name string) bool {
			return !ca.permitsServerName(name, key, now, notAfter)
		})
		if len(loopback) == 0 && !slices.ContainsFunc(hosts, func(h string) bool { return h != "" }) {
			return tls.Certificate{}, errors.New("issue server certificate: the CA's name constraints permit none of localhost, 127.0.0.1 and ::1: " +
				"give the server a name the CA may issue for (--hostname), the one devices reach it at")
		}
	}
	for _, h := range append(append([]string(nil), hosts...), loopback...) {
		if h == "" {
			continue
		}
		if ip := net.ParseIP(strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")); ip != nil {
			if k := "ip:" + ip.String(); !seen[k] {
				seen[k] = true
				ips = append(ips, ip)
			}
			continue
		}
		name := strings.ToLower(strings.TrimSuffix(h, "."))
		if !validDNSName(name) {
			return tls.Certificate{}, fmt.Errorf("issue server certificate: %q is neither an IP address nor a DNS name", h)
		}
		if k := "dns:" + name; !seen[k] {
			seen[k] = true
			dnsNames = append(dnsNames, name)
		}
	}
	leaf, err := ca.signServer(cn, dnsNames, ips, key, now, notAfter)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue server certificate: %w", err)
	}
	// An extended key usage or name constraint in the chain that forbids
	// it would make every client refuse the server.
	if err := ca.verifyIssued(leaf, x509.ExtKeyUsageServerAuth, now); err != nil {
		return tls.Certificate{}, fmt.Errorf("issue server certificate: %w", err)
	}
	chain := [][]byte{leaf.Raw}
	for _, c := range ca.chain {
		chain = append(chain, c.Raw)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

func (ca *CA) signServer(cn string, dnsNames []string, ips []net.IP, key crypto.Signer, now, notAfter time.Time) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	return ca.sign(&x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             ca.notBefore(now),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		AuthorityKeyId:        ca.skid,
		DNSNames:              dnsNames,
		IPAddresses:           ips,
	}, key.Public())
}

// permitsServerName reports whether the chain's name constraints let the
// CA issue a server certificate for name, a DNS name or an IP address, by
// issuing one (never used) and verifying it.
func (ca *CA) permitsServerName(name string, key crypto.Signer, now, notAfter time.Time) bool {
	var dnsNames []string
	ips := []net.IP{net.ParseIP(name)}
	if ips[0] == nil {
		dnsNames, ips = []string{name}, nil
	}
	leaf, err := ca.signServer(name, dnsNames, ips, key, now, notAfter)
	if err != nil {
		return false
	}
	var inv x509.CertificateInvalidError
	err = ca.verifyIssued(leaf, x509.ExtKeyUsageServerAuth, now)
	return !errors.As(err, &inv) || inv.Reason != x509.CANotAuthorizedForThisName
}

// validDNSName accepts lower-case host names, optionally with a leading
// wildcard label; it keeps a host:port or URL in a config file from becoming
// a useless SAN.
func validDNSName(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for i, label := range strings.Split(name, ".") {
		if label == "*" && i == 0 {
			continue
		}
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for j := 0; j < len(label); j++ {
			c := label[j]
			if !isIDAlnum(c) && c != '-' && c != '_' {
				return false
			}
		}
	}
	return true
}

// notBefore returns the NotBefore of a certificate issued at now: backdated,
// but never before the start of the CA chain. A certificate that starts
// before its issuer verifies at no time within its first minutes, and a
// verifier that checks it at its start (the device agent does) refuses it
// for good. An operator CA made just before the server started is the case.
func (ca *CA) notBefore(now time.Time) time.Time {
	nb := now.Add(-backdate)
	if start := ca.chainStart(); nb.Before(start) {
		nb = start
	}
	return nb
}

// chainStart is the latest NotBefore in the chain: the chain verifies at no
// earlier time.
func (ca *CA) chainStart() time.Time {
	var start time.Time
	for _, c := range ca.chain {
		if c.NotBefore.After(start) {
			start = c.NotBefore
		}
	}
	return start
}

// issuedBetween returns the span in which the CA issued leaf, one of its
// certificates, as far as leaf.NotBefore tells (see notBefore): backdate
// after it, or anywhere in the backdate after it when it is the start of
// the chain. Certificate times have whole seconds; callers allow for that.
func (ca *CA) issuedBetween(leaf *x509.Certificate) (earliest, latest time.Time) {
	latest = leaf.NotBefore.Add(backdate)
	if leaf.NotBefore.Equal(ca.chainStart()) {
		return leaf.NotBefore, latest
	}
	return latest, latest
}

// ChainEnd returns when the CA chain stops verifying, the earliest NotAfter
// in it: every certificate the CA issues ends by then at the latest.
func (ca *CA) ChainEnd() time.Time {
	end := ca.cert.NotAfter
	for _, c := range ca.chain {
		if c.NotAfter.Before(end) {
			end = c.NotAfter
		}
	}
	return end
}

// SignsCRLs reports whether the CA may sign CRLs (key usage cRLSign). Only
// the CA of a fleet served before that was checked at start may not; its
// CRL cannot be published.
func (ca *CA) SignsCRLs() bool { return ca.cert.KeyUsage&x509.KeyUsageCRLSign != 0 }

// notAfter returns now+lifetime, capped at the end of the CA chain, since a
// certificate outliving its issuer, or its issuer's issuer, does not verify
// anyway: not with clients that check the whole chain up to the root.
func (ca *CA) notAfter(now time.Time, lifetime time.Duration) (time.Time, error) {
	if lifetime <= 0 {
		return time.Time{}, fmt.Errorf("issue certificate: lifetime %s is not positive", lifetime)
	}
	if start := ca.chainStart(); now.Before(start) {
		// The clock went back since the CA was loaded.
		return time.Time{}, fmt.Errorf("issue certificate: %w: it says %s, the chain starts at %s: set the clock",
			ErrClockBeforeCA, now.UTC().Format(time.RFC3339), start.UTC().Format(time.RFC3339))
	}
	end := ca.ChainEnd()
	if !now.Before(end) {
		return time.Time{}, fmt.Errorf("issue certificate: %w at %s: renew the CA certificate for its key (README.md: Renewing or replacing the CA)",
			ErrCAExpired, end.UTC().Format(time.RFC3339))
	}
	na := now.Add(lifetime)
	if na.After(end) {
		na = end
	}
	return na, nil
}

func (ca *CA) sign(tmpl *x509.Certificate, pub crypto.PublicKey) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue certificate: parse: %w", err)
	}
	return cert, nil
}

// SignedCRL is a CRL the CA signed, with the validity it states.
type SignedCRL struct {
	DER []byte
	// ThisUpdate and NextUpdate as encoded: UTC, whole seconds. Given
	// here, the CRL need not be parsed again, which takes a third as long
	// as signing one of thousands of entries.
	ThisUpdate, NextUpdate time.Time
}

// CRL returns a DER X.509 v2 CRL signed by the CA listing revoked, valid from
// now until now+nextUpdate. number must grow with every CRL issued (RFC 5280
// §5.2.3). Certificates that expired more than a day ago are left out: no
// verifier accepts them anyway. Every entry must have a revocation time and
// a serial in SerialHex form; anything else is a bug in the caller and an
// error.
func (ca *CA) CRL(revoked []store.Revocation, number *big.Int, nextUpdate time.Duration) (SignedCRL, error) {
	if number == nil || number.Sign() < 0 {
		return SignedCRL{}, errors.New("create crl: number must be non-negative")
	}
	if nextUpdate <= 0 {
		return SignedCRL{}, fmt.Errorf("create crl: next update %s is not positive", nextUpdate)
	}
	if ca.cert.KeyUsage&x509.KeyUsageCRLSign == 0 {
		return SignedCRL{}, errors.New("create crl: the CA certificate may not sign CRLs (key usage cRLSign missing)")
	}
	now := ca.now()
	entries := make([]x509.RevocationListEntry, 0, len(revoked))
	for _, c := range revoked {
		if c.RevokedAt.IsZero() {
			return SignedCRL{}, fmt.Errorf("create crl: certificate %q is not revoked", c.Serial)
		}
		if !c.NotAfter.IsZero() && c.NotAfter.Before(now.Add(-crlExpiredGrace)) {
			continue
		}
		serial, ok := new(big.Int).SetString(c.Serial, 16)
		if !ok || serial.Sign() <= 0 || SerialHex(serial) != c.Serial {
			return SignedCRL{}, fmt.Errorf("create crl: certificate serial %q is not lowercase hex without leading zeros", c.Serial)
		}
		entries = append(entries, x509.RevocationListEntry{SerialNumber: serial, RevocationTime: c.RevokedAt.UTC()})
	}
	// CreateRevocationList takes AuthorityKeyId from the issuer and insists
	// on one; an operator CA may lack the extension.
	issuer := *ca.cert
	issuer.SubjectKeyId = ca.skid
	// The encoding drops fractions of a second: so do the dates returned.
	tmpl := &x509.RevocationList{
		Number:                    number,
		ThisUpdate:                now.UTC().Truncate(time.Second),
		NextUpdate:                now.Add(nextUpdate).UTC().Truncate(time.Second),
		RevokedCertificateEntries: entries,
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, &issuer, ca.key)
	if err != nil {
		return SignedCRL{}, fmt.Errorf("create crl: %w", err)
	}
	return SignedCRL{DER: der, ThisUpdate: tmpl.ThisUpdate, NextUpdate: tmpl.NextUpdate}, nil
}
