package enroll

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
)

// MaxCSRSize is the largest CSR ParseCSR accepts, PEM or DER. Real CSRs for
// the allowed keys are well under 8 KiB.
const MaxCSRSize = 64 << 10

// RSA key sizes CheckKey accepts. The upper bound keeps the cost of verifying
// a signature, which an unauthenticated client can make the server do, small.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// ParseCSR parses a PKCS#10 certificate request, PEM ("CERTIFICATE REQUEST"
// or "NEW CERTIFICATE REQUEST", nothing but white space around the block) or
// raw DER, and checks its key type and its self-signature. Errors are *Error
// with CodeCSRInvalid or CodeKeyUnsupported.
//
// The key is checked before the signature: it is cheaper, and it refuses an
// oversized RSA key before the server spends time verifying with it.
func ParseCSR(data []byte) (*x509.CertificateRequest, error) {
	if len(data) == 0 {
		return nil, Errorf(CodeCSRInvalid, "csr is empty")
	}
	if len(data) > MaxCSRSize {
		return nil, Errorf(CodeCSRInvalid, "csr is larger than %d bytes", MaxCSRSize)
	}
	der := data
	if trimmed := bytes.TrimLeft(data, " \t\r\n"); bytes.HasPrefix(trimmed, []byte("-----BEGIN ")) {
		block, rest := pem.Decode(trimmed)
		if block == nil {
			return nil, Errorf(CodeCSRInvalid, "csr is not valid PEM")
		}
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return nil, Errorf(CodeCSRInvalid, "csr PEM block must be CERTIFICATE REQUEST, got %q", truncate(block.Type, 40))
		}
		if len(block.Headers) != 0 {
			return nil, Errorf(CodeCSRInvalid, "csr PEM block must not have headers")
		}
		if len(bytes.TrimSpace(rest)) != 0 {
			return nil, Errorf(CodeCSRInvalid, "csr has data after the PEM block")
		}
		der = block.Bytes
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, &Error{Code: CodeCSRInvalid, Message: "csr is not a valid PKCS#10 request", Err: err}
	}
	if csr.PublicKey == nil {
		return nil, Errorf(CodeKeyUnsupported, "csr key algorithm is not supported; %s", allowedKeys)
	}
	if err := CheckKey(csr.PublicKey); err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, &Error{Code: CodeCSRInvalid, Message: "csr signature does not verify", Err: err}
	}
	return csr, nil
}

const allowedKeys = "use ECDSA P-256 or P-384, Ed25519, or RSA 2048 to 8192 bits"

// CheckKey reports whether pub is a key the CA certifies: ECDSA P-256 or
// P-384 with a valid point, Ed25519, or RSA of 2048 to 8192 bits with a sane
// exponent. Anything else is an *Error with CodeKeyUnsupported.
func CheckKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k == nil || k.Curve == nil {
			break
		}
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			name := "unknown"
			if p := k.Curve.Params(); p != nil && p.Name != "" {
				name = p.Name
			}
			return Errorf(CodeKeyUnsupported, "ecdsa curve %s is not supported; %s", name, allowedKeys)
		}
		// ECDH validates the point; a key built by hand rather than
		// parsed may be off the curve.
		if _, err := k.ECDH(); err != nil {
			return &Error{Code: CodeKeyUnsupported, Message: "ecdsa public key is not a valid curve point", Err: err}
		}
		return nil
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return Errorf(CodeKeyUnsupported, "ed25519 public key has the wrong size")
		}
		return nil
	case *rsa.PublicKey:
		if k == nil || k.N == nil {
			break
		}
		if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
			return Errorf(CodeKeyUnsupported, "rsa key of %d bits is not supported; %s", bits, allowedKeys)
		}
		if k.E < 3 || k.E%2 == 0 {
			return Errorf(CodeKeyUnsupported, "rsa public exponent is invalid")
		}
		return nil
	}
	return Errorf(CodeKeyUnsupported, "key type is not supported; %s", allowedKeys)
}

// truncate shortens client-supplied text before it goes into a message.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
