package agent

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"
)

// identity is the device's key pair and trust anchors as loaded from the
// state folder. It is immutable; a renewal produces a new one.
type identity struct {
	deviceID string
	key      crypto.Signer
	leaf     *x509.Certificate
	cert     tls.Certificate // leaf + key, Leaf set, for tls.Config
	caPEM    []byte
	roots    *x509.CertPool
	jitter   float64   // drawn once per certificate so its renewal time is stable
	received time.Time // when the agent got the certificate; zero if unknown
}

func (id *identity) serial() string { return id.leaf.SerialNumber.Text(16) }

func newKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return k, nil
}

func marshalKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseKey(b []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM block in key")
	}
	switch blk.Type {
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse key: %w", err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, errors.New("key cannot sign")
		}
		return s, nil
	case "EC PRIVATE KEY":
		k, err := x509.ParseECPrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse key: %w", err)
		}
		return k, nil
	}
	return nil, fmt.Errorf("unexpected PEM block %q in key", blk.Type)
}

// makeCSR returns a PEM CSR and its DER. An empty cn lets the server use the
// id the token is bound to.
func makeCSR(k crypto.Signer, cn string) (pemBytes, der []byte, err error) {
	der, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: cn},
	}, k)
	if err != nil {
		return nil, nil, fmt.Errorf("create csr: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), der, nil
}

// parseCerts returns every CERTIFICATE block of a PEM bundle, in order.
func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate in PEM")
	}
	return out, nil
}

func certPool(certs []*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

// publicKeysEqual reports whether a certificate carries the key's public half.
func publicKeysEqual(c *x509.Certificate, k crypto.Signer) bool {
	pub, ok := k.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(c.PublicKey)
}

// errNoChain is a certificate that does not verify against its CA bundle
// at any time.
var errNoChain = errors.New("certificate does not chain to the CA bundle")

// verifiesAgainst checks the chain of leaf against the CA bundle at a time
// within the validity of every certificate of the chain, not at the local
// clock, which may be wrong: this is a consistency check of files, not a
// validity check. The leaf's own start is not such a time when the server
// backdated it before its CA's start (older fleetmq servers did, with a CA
// younger than their 5 minutes of backdating): a chain that verifies at all does so at the
// latest start among its certificates, so each start within the leaf's
// validity is tried.
func verifiesAgainst(leaf *x509.Certificate, caPEM []byte) error {
	cas, err := parseCerts(caPEM)
	if err != nil {
		return err
	}
	opts := x509.VerifyOptions{Roots: certPool(cas), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
	var firstErr error
	for _, at := range chainCheckTimes(leaf, cas) {
		opts.CurrentTime = at
		_, err := leaf.Verify(opts)
		if err == nil {
			return nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	var ci x509.CertificateInvalidError
	if errors.As(firstErr, &ci) && ci.Reason == x509.Expired {
		// x509 calls the time it checked at "current time": misleading
		// here, since none of them was.
		return fmt.Errorf("%w: the certificate (valid %s to %s) and its CA are never valid at the same time",
			errNoChain, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return fmt.Errorf("%w: %w", errNoChain, firstErr)
}

// chainCheckTimes returns the times verifiesAgainst tries: a second into
// the leaf's validity, and a second after each CA start within it.
func chainCheckTimes(leaf *x509.Certificate, cas []*x509.Certificate) []time.Time {
	times := []time.Time{leaf.NotBefore.Add(time.Second)}
	for _, c := range cas {
		if c.NotBefore.After(leaf.NotBefore) && c.NotBefore.Before(leaf.NotAfter) {
			times = append(times, c.NotBefore.Add(time.Second))
		}
	}
	return times
}

// newIdentity assembles an identity and checks it is consistent.
func newIdentity(keyPEM, certPEM, caPEM []byte) (*identity, error) {
	k, err := parseKey(keyPEM)
	if err != nil {
		return nil, err
	}
	return identityFromKey(k, certPEM, caPEM)
}

func identityFromKey(k crypto.Signer, certPEM, caPEM []byte) (*identity, error) {
	chain, err := parseCerts(certPEM)
	if err != nil {
		return nil, err
	}
	leaf := chain[0]
	if !publicKeysEqual(leaf, k) {
		return nil, errors.New("certificate does not match the key")
	}
	if leaf.Subject.CommonName == "" {
		return nil, errors.New("certificate has no common name")
	}
	cas, err := parseCerts(caPEM)
	if err != nil {
		return nil, fmt.Errorf("ca bundle: %w", err)
	}
	der := make([][]byte, len(chain))
	for i, c := range chain {
		der[i] = c.Raw
	}
	return &identity{
		deviceID: leaf.Subject.CommonName,
		key:      k,
		leaf:     leaf,
		cert:     tls.Certificate{Certificate: der, PrivateKey: k, Leaf: leaf},
		caPEM:    caPEM,
		roots:    certPool(cas),
	}, nil
}

// readOptional returns nil for a missing file.
func readOptional(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Base(path), err)
	}
	return b, nil
}

// ErrKeyMissing is a cert.pem without its key.pem. No crash leaves that
// (commitIdentity puts the key in place first): the key was deleted, and
// nothing brings it back.
var ErrKeyMissing = errors.New("key.pem is missing although cert.pem is there: the private key cannot be recovered; " + adviceReenroll)

// identityPick is the key pair loadIdentity settles on, found without
// changing anything in the folder.
type identityPick struct {
	key     crypto.Signer
	leaf    *x509.Certificate
	certPEM []byte
	caPEM   []byte
	// What the folder holds besides the winner under its canonical names;
	// loadIdentity renames or removes these.
	keyNext, certNext, caNext bool // the winner's file is the .next one
	staleKey, staleCert       bool // a .next file not part of the winner
	staleCA                   bool // a ca.pem.next the winner does not chain to
}

// pickIdentity reads the candidate key pairs and picks the one loadIdentity
// uses, changing nothing: `status` calls it too.
//
// Candidates are {key.pem, key.pem.next} × {cert.pem, cert.pem.next}; of the
// pairs whose certificate matches its key, the most recently issued (latest
// NotBefore) wins. A .next file that is not part of the winner belongs to an
// aborted commit whose certificate was never fully written. The .next names
// are read first: a commit renames .next to canonical, so a reader racing
// it sees each new file under one name or the other.
func pickIdentity(dir string) (*identityPick, error) {
	p := func(name string) string { return filepath.Join(dir, name) }
	names := [2][2]string{{keyFile, keyFile + nextSuffix}, {certFile, certFile + nextSuffix}}
	var files [2][2][]byte // [key, cert][canonical, next]
	for kind := range names {
		for _, i := range []int{1, 0} {
			b, err := readOptional(p(names[kind][i]))
			if err != nil {
				return nil, err
			}
			files[kind][i] = b
		}
	}
	keys, certs := files[0], files[1]
	switch {
	case certs[0] == nil && certs[1] == nil:
		// Without a certificate a key is useless: a first enrollment that
		// crashed before its certificate was written starts over.
		return nil, ErrNotEnrolled
	case keys[0] == nil && keys[1] == nil:
		return nil, ErrKeyMissing
	}

	var best identityPick
	bk, bc := -1, -1
	var firstErr error
	for ki := range keys {
		if keys[ki] == nil {
			continue
		}
		k, err := parseKey(keys[ki])
		if err != nil {
			firstErr = cmpErr(firstErr, fmt.Errorf("%s: %w", names[0][ki], err))
			continue
		}
		for ci := range certs {
			if certs[ci] == nil {
				continue
			}
			chain, err := parseCerts(certs[ci])
			if err != nil {
				firstErr = cmpErr(firstErr, fmt.Errorf("%s: %w", names[1][ci], err))
				continue
			}
			if !publicKeysEqual(chain[0], k) {
				firstErr = cmpErr(firstErr, fmt.Errorf("%s does not match %s (the certificate of another key, or of another device)",
					names[1][ci], names[0][ki]))
				continue
			}
			if best.leaf == nil || !chain[0].NotBefore.Before(best.leaf.NotBefore) {
				best.key, best.leaf, best.certPEM, bk, bc = k, chain[0], certs[ci], ki, ci
			}
		}
	}
	if best.leaf == nil {
		if firstErr == nil {
			firstErr = errors.New("no certificate")
		}
		// Only the server can issue a certificate, and nothing brings a
		// lost key back: a backup, or a new enrollment under the same id.
		return nil, fmt.Errorf("load identity: %w; restore the file from a backup if there is one, else %s", firstErr, adviceReenroll)
	}
	best.keyNext, best.certNext = bk == 1, bc == 1
	best.staleKey = bk == 0 && keys[1] != nil
	best.staleCert = bc == 0 && certs[1] != nil

	caNext, err := readOptional(p(caFile + nextSuffix))
	if err != nil {
		return nil, err
	}
	caPEM, err := readOptional(p(caFile))
	if err != nil {
		return nil, err
	}
	if caNext != nil {
		// Written before the key pair: it belongs to the winner if the
		// winner chains to it; otherwise its commit was aborted.
		if verifiesAgainst(best.leaf, caNext) == nil {
			best.caNext, caPEM = true, caNext
		} else {
			best.staleCA = true
		}
	}
	if caPEM == nil {
		return nil, errors.New("load identity: ca.pem missing; " + adviceCA)
	}
	if _, err := parseCerts(caPEM); err != nil {
		return nil, fmt.Errorf("load identity: ca.pem: %w; %s", err, adviceCA)
	}
	best.caPEM = caPEM
	return &best, nil
}

// loadIdentity reads the key pair, finishing or discarding a commit that a
// crash interrupted (see commitIdentity and pickIdentity), and makes sure
// key.pem is private. The caller holds identity.lock.
func loadIdentity(dir string, log zerolog.Logger) (*identity, error) {
	p := func(name string) string { return filepath.Join(dir, name) }
	pick, err := pickIdentity(dir)
	if err != nil {
		return nil, err
	}
	// Roll the winner forward to the canonical names.
	for _, f := range []struct {
		name        string
		next, stale bool
	}{
		{keyFile, pick.keyNext, pick.staleKey},
		{certFile, pick.certNext, pick.staleCert},
		{caFile, pick.caNext, pick.staleCA},
	} {
		if f.next {
			if err := os.Rename(p(f.name+nextSuffix), p(f.name)); err != nil {
				return nil, fmt.Errorf("finish commit of %s: %w", f.name, err)
			}
		} else if f.stale {
			_ = os.Remove(p(f.name + nextSuffix))
		}
	}
	if pick.keyNext || pick.certNext || pick.caNext || pick.staleKey || pick.staleCert || pick.staleCA {
		if err := syncDir(dir); err != nil {
			return nil, err
		}
	}
	if err := ensureKeyPrivate(p(keyFile), log); err != nil {
		return nil, err
	}
	return pick.identity()
}

// identity assembles the picked pair and checks what every committed
// identity satisfies (acceptCertResponse checked more before the commit):
// the certificate names a device and was issued by a CA of the bundle next
// to it. A ca.pem swapped for another fleet's would otherwise only show as
// TLS failures, over and over.
func (pick *identityPick) identity() (*identity, error) {
	id, err := identityFromKey(pick.key, pick.certPEM, pick.caPEM)
	if err != nil {
		return nil, err
	}
	if err := signedByBundle(id.leaf, id.caPEM); err != nil {
		return nil, fmt.Errorf("%w; %s", err, adviceCA)
	}
	return id, nil
}

// adviceCA is how a device gets its fleet CA bundle back. The bundle
// fetched is checked by hand: the agent would trust every CA in it for
// the broker and the enrollment server.
const adviceCA = "put the fleet's CA bundle back in ca.pem (the server's GET /v1/ca, whose first certificate's " +
	"sha256 must be the one fleetmq ca show prints on the server), or " + adviceReenroll

// signedByBundle checks that a CA of the bundle signed leaf. Unlike
// verifiesAgainst it looks at no date: whether the files belong together
// must not depend on the clock, nor on how the CA's validity and the
// leaf's backdating line up.
func signedByBundle(leaf *x509.Certificate, caPEM []byte) error {
	cas, err := parseCerts(caPEM)
	if err != nil {
		return fmt.Errorf("ca.pem: %w", err)
	}
	for _, ca := range cas {
		if leaf.CheckSignatureFrom(ca) == nil {
			return nil
		}
	}
	return errors.New("cert.pem was not issued by a CA in ca.pem (is ca.pem another fleet's?)")
}

// keyModeProblem describes a key file that users other than its owner may
// access, or returns "".
func keyModeProblem(mode fs.FileMode) string {
	if mode.Perm()&0o077 == 0 {
		return ""
	}
	return fmt.Sprintf("key.pem has mode %04o: other users may read the private key", mode.Perm())
}

// ensureKeyPrivate gives key.pem mode 0600 if group or others have any
// access (a copy or restore with the wrong umask), and refuses to go on if
// it cannot: a key others can read is no proof of identity.
func ensureKeyPrivate(path string, log zerolog.Logger) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("check key mode: %w", err)
	}
	problem := keyModeProblem(st.Mode())
	if problem == "" {
		return nil
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("%s, and making it 0600 failed: %w (run chmod 600 %s as its owner)", problem, err, path)
	}
	log.Warn().Str("file", path).Str("old_mode", fmt.Sprintf("%04o", st.Mode().Perm())).
		Msg(problem + "; set it to 0600. Anyone who read it may hold a copy: device-agent renew replaces the key")
	return nil
}

func cmpErr(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

func certPEMOf(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// certPEM is the certificate chain as PEM.
func (id *identity) certPEM() []byte {
	var out []byte
	for _, der := range id.cert.Certificate {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	return out
}

// commitIdentity replaces the key pair and CA bundle. The caller holds
// identity.lock. Two files cannot be renamed atomically together, so the new
// files are first written completely under .next names (CA first, then key,
// then certificate: a complete cert.pem.next marks the commit as decided),
// then renamed. loadIdentity finishes the job after a crash at any point.
func commitIdentity(dir string, id *identity) error {
	p := func(name string) string { return filepath.Join(dir, name) }
	keyPEM, err := marshalKey(id.key)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(p(caFile+nextSuffix), id.caPEM, 0o644); err != nil {
		return err
	}
	if err := writeFileAtomic(p(keyFile+nextSuffix), keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeFileAtomic(p(certFile+nextSuffix), id.certPEM(), 0o644); err != nil {
		return err
	}
	for _, name := range []string{keyFile, certFile, caFile} {
		if err := os.Rename(p(name+nextSuffix), p(name)); err != nil {
			return fmt.Errorf("commit %s: %w", name, err)
		}
	}
	return syncDir(dir)
}
