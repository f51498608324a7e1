package broker

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// forgeDevice issues a certificate for id with the CA's key directly,
// bypassing the id rules of enroll.CA.IssueDevice, as a CA operated outside
// fleetmq could, and records it in the store as an enrolled device: for ids
// the broker must refuse on its own.
func (f *fixture) forgeDevice(tb testing.TB, id string) tls.Certificate {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(f.dbPath), "ca", "ca.key"))
	if err != nil {
		tb.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		tb.Fatal("no PEM in ca.key")
	}
	caKey, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial.Add(serial, big.NewInt(1)),
		Subject:      pkix.Name{CommonName: id},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.ca.Cert(), &key.PublicKey, caKey.(crypto.Signer))
	if err != nil {
		tb.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	ctx := context.Background()
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		tb.Fatal(err)
	}
	hash := sha256.Sum256(secret)
	tok := store.Token{ID: hex.EncodeToString(hash[:6]), Hash: hash, MaxUses: 1, ExpiresAt: now.Add(time.Hour)}
	if err := f.db.CreateTokens(ctx, []store.Token{tok}, "test", now); err != nil {
		tb.Fatal(err)
	}
	rec := store.Cert{Serial: enroll.SerialHex(leaf.SerialNumber), DeviceID: id, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter, DER: der}
	if err := f.db.Enroll(ctx, store.Enrollment{TokenHash: hash, Device: store.Device{ID: id}, Cert: rec, Remote: "test", Now: now}); err != nil {
		tb.Fatalf("enroll %s: %v", id, err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}
