package broker

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
)

// The server certificate's chain may end with the root CA, which every
// client must already hold to trust it (RFC 8446 §4.4.2 lets a server
// leave it out). Sent anyway, it costs each handshake bytes on the wire,
// and the client a parse and a second chain to try: Go's verifier checks
// the leaf against the copy it got as an intermediate as well as against
// its trusted root, which doubles its work (67 µs → 133 µs per connect on
// the benchmark machine). The broker sends the chain without it.

// trimmed is a server certificate and its chain without a trailing root.
type trimmed struct {
	src, out *tls.Certificate
}

// getCertificate returns cfg.GetCertificate's certificate, its chain
// without a self-signed root at the end. The trimmed copy is made once per
// certificate (the caller hands out a new one when it renews).
func (b *Broker) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	c, err := b.cfg.GetCertificate(hello)
	if err != nil || c == nil {
		return c, err
	}
	if t := b.serverCert.Load(); t != nil && t.src == c {
		return t.out, nil
	}
	out := withoutRoot(c)
	b.serverCert.Store(&trimmed{src: c, out: out})
	return out, nil
}

// withoutRoot returns c, or a copy of c whose chain lacks its last
// certificate when that one is self-signed and not the leaf.
func withoutRoot(c *tls.Certificate) *tls.Certificate {
	n := len(c.Certificate)
	if n < 2 {
		return c
	}
	last, err := x509.ParseCertificate(c.Certificate[n-1])
	if err != nil || !bytes.Equal(last.RawSubject, last.RawIssuer) || last.CheckSignatureFrom(last) != nil {
		return c
	}
	out := *c
	out.Certificate = c.Certificate[: n-1 : n-1]
	return &out
}
