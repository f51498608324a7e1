package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"
)

// pki is the run's CA; fleetmq gets it as the operator CA (--ca-cert,
// --ca-key) and mosquitto as its cafile, so both brokers accept the very
// same device certificates.
type pki struct {
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	pool     *x509.CertPool
	certPath string
	keyPath  string
}

func newPKI(dir string) (*pki, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(),
		Subject:               pkix.Name{CommonName: "fleetmq bench CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &pki{cert: cert, key: key, pool: x509.NewCertPool(),
		certPath: filepath.Join(dir, "ca.pem"), keyPath: filepath.Join(dir, "ca.key")}
	p.pool.AddCert(cert)
	if err := writePEM(p.certPath, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return p, writePEM(p.keyPath, "PRIVATE KEY", kder, 0o600)
}

// serverCert issues an ECDSA P-256 certificate for 127.0.0.1, the kind
// fleetmq issues itself, and writes it and its key as PEM files.
func (p *pki) serverCert(certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		return fmt.Errorf("create server certificate: %w", err)
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(keyPath, "PRIVATE KEY", kder, 0o600)
}

// device is one identity of the run: its key, and the certificate that
// enrollment returned.
type device struct {
	id   string
	key  *ecdsa.PrivateKey
	csr  []byte // DER
	cert tls.Certificate
}

// newDevices makes the keys and CSRs of ids on every core; that is the
// devices' work, so it happens before any timer starts.
func newDevices(ids []string) ([]*device, error) {
	devs := make([]*device, len(ids))
	errs := make(chan error, len(ids))
	next := make(chan int)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for i := range next {
				key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				if err != nil {
					errs <- err
					continue
				}
				csr, err := x509.CreateCertificateRequest(rand.Reader,
					&x509.CertificateRequest{Subject: pkix.Name{CommonName: ids[i]}}, key)
				if err != nil {
					errs <- err
					continue
				}
				devs[i] = &device{id: ids[i], key: key, csr: csr}
			}
		})
	}
	for i := range ids {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, fmt.Errorf("device keys: %w", err)
	}
	return devs, nil
}

// setCert records the enrolled certificate, parsed once here so that no
// dial pays for it.
func (d *device) setCert(der []byte) error {
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("certificate of %s: %w", d.id, err)
	}
	if leaf.Subject.CommonName != d.id {
		return fmt.Errorf("certificate of %s has CN %q", d.id, leaf.Subject.CommonName)
	}
	d.cert = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: d.key, Leaf: leaf}
	return nil
}

// tlsConfig is the device's client configuration; cache, when not nil,
// lets it resume TLS sessions. The defaults are Go's, as in the
// device-agent.
func (d *device) tlsConfig(roots *x509.CertPool, cache tls.ClientSessionCache) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{d.cert},
		RootCAs:            roots,
		ServerName:         "127.0.0.1",
		ClientSessionCache: cache,
	}
}

func loadKeyPair(certPath, keyPath string) (tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load %s: %w", certPath, err)
	}
	return c, nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func randSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n.Add(n, big.NewInt(1))
}
