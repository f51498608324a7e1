package enroll

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"slices"
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
// raw DER, and checks its key type and its self-signature, which must not
// use SHA-1 or MD5. A subject with more than one CN is refused. Errors are
// *Error with CodeCSRInvalid or CodeKeyUnsupported.
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
		if e := unsupportedCurve(der); e != nil {
			e.Err = err
			return nil, e
		}
		return nil, &Error{Code: CodeCSRInvalid, Message: "csr is not a valid PKCS#10 request", Err: err}
	}
	// pkix.Name keeps the last of several CNs, so /CN=zz-evil/CN=pi-0009
	// would read as pi-0009 here, and pass the bound-token and renewal
	// rules, while other tools show zz-evil. Such a subject is ambiguous.
	if n := countCN(csr.Subject.Names); n > 1 {
		return nil, Errorf(CodeCSRInvalid, "csr subject has %d CommonName (CN) attributes; give at most one, CN=<device id>", n)
	}
	if csr.PublicKey == nil {
		if isRSAPSSKey(csr.RawSubjectPublicKeyInfo) {
			return nil, Errorf(CodeKeyUnsupported, "csr key is an RSASSA-PSS key, not an RSA key (openssl: -newkey rsa:2048, not rsa-pss); %s", allowedKeys)
		}
		return nil, Errorf(CodeKeyUnsupported, "csr key algorithm is not supported; %s", allowedKeys)
	}
	if err := CheckKey(csr.PublicKey); err != nil {
		return nil, err
	}
	if csr.SignatureAlgorithm == x509.UnknownSignatureAlgorithm {
		// x509 knows RSA-PSS only with a salt as long as the hash, while
		// OpenSSL 3 signs with the longest salt by default: without this
		// the request would be "does not verify", and its maker would
		// look for a fault in the key.
		return nil, Errorf(CodeCSRInvalid, "csr signature algorithm is not supported; sign with ECDSA, Ed25519, or RSA "+
			"(PKCS #1 v1.5, or PSS with a salt as long as the hash: openssl req -sigopt rsa_pss_saltlen:digest)")
	}
	if hash, weak := weakCSRHashes[csr.SignatureAlgorithm]; weak {
		return nil, Errorf(CodeCSRInvalid, "csr is signed with %s, which no longer proves that the request is the key holder's; "+
			"sign it with SHA-256 or better (openssl req -sha256, OpenSSL's default)", hash)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, &Error{Code: CodeCSRInvalid, Message: "csr signature does not verify", Err: err}
	}
	return csr, nil
}

// weakCSRHashes are the hashes of signature algorithms x509 parses whose
// collisions are within reach: a request made to collide with another
// (chosen-prefix collisions, MD5 in 2007, SHA-1 in 2020) carries that
// one's signature, so the signature does not bind the key holder to what
// this request asks for. x509 still verifies SHA-1 on a CSR; MD2 and MD5
// it refuses as "does not verify", which would send its maker looking for
// a fault in the key. No device needs them: OpenSSL and Go (device-agent)
// sign requests with SHA-256 by default. (DSA keys are refused before.)
var weakCSRHashes = map[x509.SignatureAlgorithm]string{
	x509.MD2WithRSA:    "MD2",
	x509.MD5WithRSA:    "MD5",
	x509.SHA1WithRSA:   "SHA-1",
	x509.ECDSAWithSHA1: "SHA-1",
}

var oidRSAPSS = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 10}

// isRSAPSSKey reports whether spki holds an RSASSA-PSS key (RFC 4055),
// which x509 does not parse: an RSA key restricted to PSS signatures.
func isRSAPSSKey(spki []byte) bool {
	var info struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	rest, err := asn1.Unmarshal(spki, &info)
	return err == nil && len(rest) == 0 && info.Algorithm.Algorithm.Equal(oidRSAPSS)
}

var oidCommonName = asn1.ObjectIdentifier{2, 5, 4, 3}

func countCN(names []pkix.AttributeTypeAndValue) int {
	n := 0
	for _, a := range names {
		if a.Type.Equal(oidCommonName) {
			n++
		}
	}
	return n
}

// Named curves x509 parses (P-224 and P-521 are then refused by CheckKey),
// and names of some it does not, for messages.
var (
	parsedCurves = []asn1.ObjectIdentifier{
		oidP256,
		{1, 3, 132, 0, 34}, // P-384
		{1, 3, 132, 0, 33}, // P-224
		{1, 3, 132, 0, 35}, // P-521
	}
	curveNames = map[string]string{
		"1.3.132.0.10":          "secp256k1",
		"1.2.840.10045.3.1.1":   "P-192",
		"1.3.36.3.3.2.8.1.1.7":  "brainpoolP256r1",
		"1.3.36.3.3.2.8.1.1.11": "brainpoolP384r1",
		"1.3.36.3.3.2.8.1.1.13": "brainpoolP512r1",
		"1.2.156.10197.1.301":   "SM2",
	}
)

// unsupportedCurve picks out, among the requests x509 cannot parse, those
// that fail only because their ECDSA key is on a curve Go does not
// implement (secp256k1, brainpool): x509 gives up on the key before it
// looks at anything else. For a request whose outline is a PKCS#10 request
// with such a key it returns CodeKeyUnsupported naming the curve, for any
// other nil. Only the outline is decoded, with encoding/asn1; no signature
// is checked, since none can be with such a key, and the request is refused
// either way.
func unsupportedCurve(der []byte) *Error {
	var req struct {
		Info   asn1.RawValue
		SigAlg pkix.AlgorithmIdentifier
		Sig    asn1.BitString
	}
	if rest, err := asn1.Unmarshal(der, &req); err != nil || len(rest) != 0 {
		return nil
	}
	var info struct {
		Version int
		Subject asn1.RawValue
		SPKI    struct {
			Algorithm pkix.AlgorithmIdentifier
			PublicKey asn1.BitString
		}
		Attributes asn1.RawValue
	}
	if rest, err := asn1.Unmarshal(req.Info.FullBytes, &info); err != nil || len(rest) != 0 {
		return nil
	}
	if info.Attributes.Class != asn1.ClassContextSpecific || info.Attributes.Tag != 0 ||
		!info.SPKI.Algorithm.Algorithm.Equal(oidECPublicKey) {
		return nil
	}
	var curve asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(info.SPKI.Algorithm.Parameters.FullBytes, &curve); err != nil || len(rest) != 0 {
		return Errorf(CodeKeyUnsupported, "ecdsa keys must name their curve, not give its parameters; %s", allowedKeys)
	}
	if slices.ContainsFunc(parsedCurves, curve.Equal) {
		// A curve x509 knows: the key itself is broken.
		return nil
	}
	name, ok := curveNames[curve.String()]
	if !ok {
		name = "with OID " + curve.String()
	}
	return Errorf(CodeKeyUnsupported, "ecdsa curve %s is not supported; %s", name, allowedKeys)
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
