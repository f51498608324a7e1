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
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// testCA is a CA generated at test time; nothing is ever committed.
type testCA struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	pem    []byte
	serial atomic.Int64
	// serverNames are the names (DNS or IP) in server certificates;
	// default localhost and 127.0.0.1.
	serverNames []string
}

func newTestCA(tb testing.TB) *testCA {
	tb.Helper()
	return newTestCAFrom(tb, time.Now().Add(-time.Hour))
}

// newTestCAFrom makes a CA valid from nb.
func newTestCAFrom(tb testing.TB, nb time.Time) *testCA {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test fleet CA"},
		NotBefore:             nb,
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	ca := &testCA{cert: c, key: k, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
	ca.serial.Store(100)
	return ca
}

// issue signs a certificate for pub valid from nb to na.
func (ca *testCA) issue(tb testing.TB, pub crypto.PublicKey, cn string, nb, na time.Time, server bool) *x509.Certificate {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(ca.serial.Add(1)),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    nb,
		NotAfter:     na,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		names := ca.serverNames
		if names == nil {
			names = []string{"localhost", "127.0.0.1"}
		}
		for _, n := range names {
			if ip := net.ParseIP(n); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, n)
			}
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// serverTLS is a certificate for 127.0.0.1 whose chain includes the CA, as
// the enrollment server presents it.
func (ca *testCA) serverTLS(tb testing.TB) tls.Certificate {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	c := ca.issue(tb, &k.PublicKey, "server", time.Now().Add(-time.Hour), time.Now().Add(365*24*time.Hour), true)
	return tls.Certificate{Certificate: [][]byte{c.Raw, ca.cert.Raw}, PrivateKey: k, Leaf: c}
}

// testIdentity builds a device identity valid from nb to na.
func (ca *testCA) testIdentity(tb testing.TB, id string, nb, na time.Time) *identity {
	tb.Helper()
	k, err := newKey()
	if err != nil {
		tb.Fatal(err)
	}
	c := ca.issue(tb, &k.PublicKey, id, nb, na, false)
	ident, err := identityFromKey(k, certPEMOf(c), ca.pem)
	if err != nil {
		tb.Fatal(err)
	}
	return ident
}
