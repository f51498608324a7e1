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

// verifiesAgainst checks the chain of leaf against the CA bundle at the
// certificate's own NotBefore, so a wrong local clock cannot fail it: this is
// a consistency check of files, not a validity check.
func verifiesAgainst(leaf *x509.Certificate, caPEM []byte) error {
	cas, err := parseCerts(caPEM)
	if err != nil {
		return err
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:       certPool(cas),
		CurrentTime: leaf.NotBefore.Add(time.Second),
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("certificate does not chain to the CA bundle: %w", err)
	}
	return nil
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

// loadIdentity reads the key pair, finishing or discarding a commit that a
// crash interrupted (see commitIdentity). The caller holds identity.lock.
//
// Candidates are {key.pem, key.pem.next} × {cert.pem, cert.pem.next}; of the
// pairs whose certificate matches its key, the most recently issued (latest
// NotBefore) wins and is moved to the canonical names. A .next file that is
// not part of the winner belongs to an aborted commit whose certificate was
// never fully written, so removing it loses nothing usable.
func loadIdentity(dir string) (*identity, error) {
	p := func(name string) string { return filepath.Join(dir, name) }
	var keys, certs [2][]byte
	var err error
	for i, name := range []string{keyFile, keyFile + nextSuffix} {
		if keys[i], err = readOptional(p(name)); err != nil {
			return nil, err
		}
	}
	for i, name := range []string{certFile, certFile + nextSuffix} {
		if certs[i], err = readOptional(p(name)); err != nil {
			return nil, err
		}
	}
	if (keys[0] == nil && keys[1] == nil) || (certs[0] == nil && certs[1] == nil) {
		// Without a certificate a key is useless: a first enrollment that
		// crashed before its certificate was written starts over.
		return nil, ErrNotEnrolled
	}

	var bestKey crypto.Signer
	var bestLeaf *x509.Certificate
	bk, bc := -1, -1
	var firstErr error
	for ki := range keys {
		if keys[ki] == nil {
			continue
		}
		k, err := parseKey(keys[ki])
		if err != nil {
			firstErr = cmpErr(firstErr, err)
			continue
		}
		for ci := range certs {
			if certs[ci] == nil {
				continue
			}
			chain, err := parseCerts(certs[ci])
			if err != nil {
				firstErr = cmpErr(firstErr, err)
				continue
			}
			if !publicKeysEqual(chain[0], k) {
				firstErr = cmpErr(firstErr, errors.New("certificate does not match the key"))
				continue
			}
			if bestLeaf == nil || !chain[0].NotBefore.Before(bestLeaf.NotBefore) {
				bestKey, bestLeaf, bk, bc = k, chain[0], ki, ci
			}
		}
	}
	if bestLeaf == nil {
		if firstErr == nil {
			firstErr = errors.New("no certificate")
		}
		return nil, fmt.Errorf("load identity: %w", firstErr)
	}

	// Roll the winner forward to the canonical names.
	if bk == 1 {
		if err := os.Rename(p(keyFile+nextSuffix), p(keyFile)); err != nil {
			return nil, fmt.Errorf("finish key commit: %w", err)
		}
	} else if keys[1] != nil {
		_ = os.Remove(p(keyFile + nextSuffix))
	}
	if bc == 1 {
		if err := os.Rename(p(certFile+nextSuffix), p(certFile)); err != nil {
			return nil, fmt.Errorf("finish certificate commit: %w", err)
		}
	} else if certs[1] != nil {
		_ = os.Remove(p(certFile + nextSuffix))
	}
	caPEM, err := readOptional(p(caFile))
	if err != nil {
		return nil, err
	}
	caNext, err := readOptional(p(caFile + nextSuffix))
	if err != nil {
		return nil, err
	}
	if caNext != nil {
		// Written before the key pair: it belongs to the winner if the
		// winner chains to it; otherwise its commit was aborted.
		if verifiesAgainst(bestLeaf, caNext) == nil {
			if err := os.Rename(p(caFile+nextSuffix), p(caFile)); err != nil {
				return nil, fmt.Errorf("finish ca commit: %w", err)
			}
			caPEM = caNext
		} else {
			_ = os.Remove(p(caFile + nextSuffix))
		}
	}
	if caPEM == nil {
		return nil, errors.New("load identity: ca.pem missing")
	}
	if keys[1] != nil || certs[1] != nil || caNext != nil {
		if err := syncDir(dir); err != nil {
			return nil, err
		}
	}
	certPEM, err := os.ReadFile(p(certFile))
	if err != nil {
		return nil, fmt.Errorf("read certificate: %w", err)
	}
	return identityFromKey(bestKey, certPEM, caPEM)
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
