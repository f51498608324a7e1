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
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
)

func makeCSR(tb testing.TB, key crypto.Signer) []byte {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, key)
	if err != nil {
		tb.Fatalf("create csr: %v", err)
	}
	return der
}

func csrPEM(der []byte, typ string) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// craftCSR builds a PKCS#10 request around any SubjectPublicKeyInfo, which
// x509.CreateCertificateRequest refuses to do for keys it does not support,
// and signs it with signer using ECDSA with SHA-256.
func craftCSR(tb testing.TB, spki []byte, signer crypto.Signer) []byte {
	tb.Helper()
	subject, err := asn1.Marshal(pkix.Name{CommonName: "dev"}.ToRDNSequence())
	if err != nil {
		tb.Fatal(err)
	}
	tbs, err := asn1.Marshal(struct {
		Version    int
		Subject    asn1.RawValue
		SPKI       asn1.RawValue
		Attributes asn1.RawValue
	}{
		Subject:    asn1.RawValue{FullBytes: subject},
		SPKI:       asn1.RawValue{FullBytes: spki},
		Attributes: asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true},
	})
	if err != nil {
		tb.Fatal(err)
	}
	digest := sha256.Sum256(tbs)
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		tb.Fatal(err)
	}
	return assembleCSR(tb, tbs, pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}}, sig)
}

// assembleCSR wraps a DER CertificationRequestInfo and its signature into
// a PKCS#10 request.
func assembleCSR(tb testing.TB, tbs []byte, alg pkix.AlgorithmIdentifier, sig []byte) []byte {
	tb.Helper()
	der, err := asn1.Marshal(struct {
		TBS    asn1.RawValue
		SigAlg pkix.AlgorithmIdentifier
		Sig    asn1.BitString
	}{
		TBS:    asn1.RawValue{FullBytes: tbs},
		SigAlg: alg,
		Sig:    asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)},
	})
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

func marshalSPKI(tb testing.TB, pub any) []byte {
	tb.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// rawSPKI builds a SubjectPublicKeyInfo with any algorithm and key bytes.
func rawSPKI(tb testing.TB, oid asn1.ObjectIdentifier, params []byte, key []byte) []byte {
	tb.Helper()
	alg := pkix.AlgorithmIdentifier{Algorithm: oid}
	if params != nil {
		alg.Parameters = asn1.RawValue{FullBytes: params}
	}
	der, err := asn1.Marshal(struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}{alg, asn1.BitString{Bytes: key, BitLength: 8 * len(key)}})
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// dsaSPKI is a DSA key as x509 parses it; the numbers need not form a real
// group since the key must be refused for its type alone.
func dsaSPKI(tb testing.TB) []byte {
	tb.Helper()
	params, err := asn1.Marshal(struct{ P, Q, G *big.Int }{big.NewInt(23), big.NewInt(11), big.NewInt(4)})
	if err != nil {
		tb.Fatal(err)
	}
	y, err := asn1.Marshal(big.NewInt(8))
	if err != nil {
		tb.Fatal(err)
	}
	return rawSPKI(tb, asn1.ObjectIdentifier{1, 2, 840, 10040, 4, 1}, params, y)
}

func wantCode(tb testing.TB, err error, code Code) {
	tb.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Code != code {
		tb.Fatalf("err = %v, want code %s", err, code)
	}
}

func TestParseCSRKeys(t *testing.T) {
	p256 := genP256(t)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	x, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	// ECDSA keys on curves x509 does not parse; the point is the right
	// size, but no signature is checked with it.
	ecKey := func(params any) []byte {
		der, err := asn1.Marshal(params)
		if err != nil {
			t.Fatal(err)
		}
		point := append([]byte{4}, make([]byte, 64)...)
		return rawSPKI(t, asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}, der, point)
	}
	explicit := struct {
		Version int
		Field   struct {
			Type  asn1.ObjectIdentifier
			Prime *big.Int
		}
	}{Version: 1}
	explicit.Field.Type = asn1.ObjectIdentifier{1, 2, 840, 10045, 1, 1}
	explicit.Field.Prime = big.NewInt(23)

	tests := []struct {
		name string
		der  []byte
		code Code   // empty: accepted
		msg  string // in the refusal's message
	}{
		{name: "p256", der: makeCSR(t, p256)},
		{name: "p384", der: makeCSR(t, p384)},
		{name: "ed25519", der: makeCSR(t, ed)},
		{name: "rsa2048", der: makeCSR(t, genRSA(t, 2048))},
		{name: "crafted p256", der: craftCSR(t, marshalSPKI(t, p256.Public()), p256)},
		{name: "rsa1024", der: makeCSR(t, genRSA(t, 1024)), code: CodeKeyUnsupported},
		{name: "p224", der: craftCSR(t, marshalSPKI(t, p224.Public()), p224), code: CodeKeyUnsupported},
		{name: "x25519", der: craftCSR(t, marshalSPKI(t, x.PublicKey()), p256), code: CodeKeyUnsupported},
		{name: "dsa", der: craftCSR(t, dsaSPKI(t), p256), code: CodeKeyUnsupported},
		{name: "unknown algorithm (ed448)", der: craftCSR(t, rawSPKI(t, asn1.ObjectIdentifier{1, 3, 101, 113}, nil, make([]byte, 57)), p256), code: CodeKeyUnsupported},
		{name: "secp256k1", der: craftCSR(t, ecKey(asn1.ObjectIdentifier{1, 3, 132, 0, 10}), p256), code: CodeKeyUnsupported, msg: "ecdsa curve secp256k1 is not supported"},
		{name: "brainpoolP384r1", der: craftCSR(t, ecKey(asn1.ObjectIdentifier{1, 3, 36, 3, 3, 2, 8, 1, 1, 11}), p256), code: CodeKeyUnsupported, msg: "ecdsa curve brainpoolP384r1 is not supported"},
		{name: "curve without a name", der: craftCSR(t, ecKey(asn1.ObjectIdentifier{1, 2, 3, 4}), p256), code: CodeKeyUnsupported, msg: "ecdsa curve with OID 1.2.3.4 is not supported"},
		{name: "explicit curve parameters", der: craftCSR(t, ecKey(explicit), p256), code: CodeKeyUnsupported, msg: "must name their curve"},
	}
	for _, tt := range tests {
		for _, enc := range []struct {
			name string
			data []byte
		}{
			{"der", tt.der},
			{"pem", csrPEM(tt.der, "CERTIFICATE REQUEST")},
			{"new pem", csrPEM(tt.der, "NEW CERTIFICATE REQUEST")},
			{"pem with white space", append(append([]byte("\r\n \t"), csrPEM(tt.der, "CERTIFICATE REQUEST")...), "\r\n\n "...)},
		} {
			t.Run(tt.name+"/"+enc.name, func(t *testing.T) {
				csr, err := ParseCSR(enc.data)
				if tt.code != "" {
					wantCode(t, err, tt.code)
					if msg := AsError(err).Message; !strings.Contains(msg, tt.msg) {
						t.Errorf("message %q does not say %q", msg, tt.msg)
					}
					return
				}
				if err != nil {
					t.Fatalf("ParseCSR: %v", err)
				}
				if !bytes.Equal(csr.Raw, tt.der) {
					t.Error("parsed CSR is not the input")
				}
				if err := csr.CheckSignature(); err != nil {
					t.Errorf("accepted CSR's signature does not verify: %v", err)
				}
			})
		}
	}
}

func TestParseCSRMalformed(t *testing.T) {
	p256 := genP256(t)
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	good := makeCSR(t, p256)
	goodPEM := csrPEM(good, "CERTIFICATE REQUEST")
	flipLast := func(der []byte) []byte {
		b := bytes.Clone(der)
		b[len(b)-1] ^= 0x01
		return b
	}
	tamperSubject := func(der []byte) []byte {
		b := bytes.Clone(der)
		i := bytes.Index(b, []byte("dev"))
		b[i] = 'x'
		return b
	}
	cnAttr := func(cn string) pkix.AttributeTypeAndValue {
		return pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 5, 4, 3}, Value: cn}
	}
	subjectCSR := func(rdns pkix.RDNSequence) []byte {
		raw, err := asn1.Marshal(rdns)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{RawSubject: raw}, p256)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	p256Point := func(point []byte) []byte {
		return rawSPKI(t, asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}, []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}, point)
	}
	withHeaders := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Headers: map[string]string{"Proc-Type": "4,ENCRYPTED"}, Bytes: good})
	brokenBase64 := bytes.Replace(bytes.Clone(goodPEM), []byte("MI"), []byte("!!"), 1)

	tests := []struct {
		name string
		data []byte
		code Code
	}{
		{"broken p256 signature", flipLast(good), CodeCSRInvalid},
		{"broken ed25519 signature", flipLast(makeCSR(t, ed)), CodeCSRInvalid},
		{"broken rsa signature", flipLast(makeCSR(t, genRSA(t, 2048))), CodeCSRInvalid},
		{"tampered subject", tamperSubject(good), CodeCSRInvalid},
		{"signed by another key", craftCSR(t, marshalSPKI(t, p256.Public()), genP256(t)), CodeCSRInvalid},
		{"pem trailing garbage", append(bytes.Clone(goodPEM), "garbage"...), CodeCSRInvalid},
		{"pem two blocks", append(bytes.Clone(goodPEM), goodPEM...), CodeCSRInvalid},
		{"pem wrong type", csrPEM(good, "CERTIFICATE"), CodeCSRInvalid},
		{"pem headers", withHeaders, CodeCSRInvalid},
		{"pem leading text", append([]byte("Certificate Request:\n"), goodPEM...), CodeCSRInvalid},
		{"pem broken base64", brokenBase64, CodeCSRInvalid},
		{"pem unterminated", goodPEM[:len(goodPEM)-10], CodeCSRInvalid},
		{"der trailing byte", append(bytes.Clone(good), 0), CodeCSRInvalid},
		{"der truncated", good[:len(good)-1], CodeCSRInvalid},
		{"garbage", []byte("hello, world"), CodeCSRInvalid},
		{"empty", []byte{}, CodeCSRInvalid},
		{"nil", nil, CodeCSRInvalid},
		{"certificate instead", newTestCA(t, testNow).Cert().Raw, CodeCSRInvalid},
		{"oversize", append(bytes.Clone(goodPEM), bytes.Repeat([]byte("\n"), MaxCSRSize)...), CodeCSRInvalid},
		// pkix.Name would keep the last CN: pi-0009, where other tools show zz-evil.
		{"two CNs", subjectCSR(pkix.RDNSequence{{cnAttr("zz-evil")}, {cnAttr("pi-0009")}}), CodeCSRInvalid},
		{"two CNs in one RDN", subjectCSR(pkix.RDNSequence{{cnAttr("zz-evil"), cnAttr("pi-0009")}}), CodeCSRInvalid},
		// A curve x509 knows, but no point on it: malformed, not unsupported.
		{"P-256 key that is no point", craftCSR(t, p256Point(append([]byte{4}, make([]byte, 64)...)), p256), CodeCSRInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			csr, err := ParseCSR(tt.data)
			if err == nil {
				t.Fatalf("accepted a CSR for %q", csr.Subject.CommonName)
			}
			wantCode(t, err, tt.code)
		})
	}
	// The table's inputs differ from an accepted one only in the broken part.
	if _, err := ParseCSR(goodPEM); err != nil {
		t.Fatalf("good CSR refused: %v", err)
	}
}

func TestCheckKey(t *testing.T) {
	p256 := genP256(t)
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	bits := func(n int) *big.Int { return new(big.Int).SetBit(big.NewInt(1), n-1, 1) }
	tests := []struct {
		name string
		pub  crypto.PublicKey
		ok   bool
	}{
		{"p256", p256.Public(), true},
		{"ed25519", edPub, true},
		{"rsa 2048 bits", &rsa.PublicKey{N: bits(2048), E: 65537}, true},
		{"rsa 8192 bits", &rsa.PublicKey{N: bits(8192), E: 65537}, true},
		{"rsa 2047 bits", &rsa.PublicKey{N: bits(2047), E: 65537}, false},
		{"rsa 8193 bits", &rsa.PublicKey{N: bits(8193), E: 65537}, false},
		{"rsa exponent 1", &rsa.PublicKey{N: bits(2048), E: 1}, false},
		{"rsa even exponent", &rsa.PublicKey{N: bits(2048), E: 65536}, false},
		{"rsa nil modulus", &rsa.PublicKey{E: 65537}, false},
		{"nil rsa", (*rsa.PublicKey)(nil), false},
		{"p521", p521.Public(), false},
		//lint:ignore SA1019 a hostile key is built from raw coordinates on purpose
		{"p256 point off the curve", &ecdsa.PublicKey{Curve: elliptic.P256(), X: big.NewInt(1), Y: big.NewInt(1)}, false},
		{"ecdsa without curve", &ecdsa.PublicKey{}, false},
		{"nil ecdsa", (*ecdsa.PublicKey)(nil), false},
		{"short ed25519", edPub[:31], false},
		{"ed25519 private key", ed25519.PrivateKey(make([]byte, 64)), false},
		{"ecdsa private key", p256, false},
		{"nil", nil, false},
		{"string", "key", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckKey(tt.pub)
			if tt.ok {
				if err != nil {
					t.Errorf("CheckKey = %v, want nil", err)
				}
				return
			}
			wantCode(t, err, CodeKeyUnsupported)
		})
	}
}

func FuzzParseCSR(f *testing.F) {
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	good := makeCSR(f, p256)
	f.Add(good)
	f.Add(csrPEM(good, "CERTIFICATE REQUEST"))
	f.Add(csrPEM(good, "NEW CERTIFICATE REQUEST"))
	f.Add(makeCSR(f, ed))
	f.Add(craftCSR(f, dsaSPKI(f), p256))
	sha1, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{SignatureAlgorithm: x509.ECDSAWithSHA1}, p256)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(sha1)
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		csr, err := ParseCSR(data)
		if !checkCSROutcome(t, csr, err) {
			return
		}
	})
}

// checkCSROutcome is the property every CSR decoder's fuzz target checks: a
// refusal is a client error with a CSR code, and an accepted CSR has a
// signature that verifies, not over SHA-1 or MD5, and a key fleetmq
// accepts. It reports whether the CSR was accepted.
func checkCSROutcome(t *testing.T, csr *x509.CertificateRequest, err error) bool {
	t.Helper()
	if err != nil {
		var e *Error
		if !errors.As(err, &e) || (e.Code != CodeCSRInvalid && e.Code != CodeKeyUnsupported) {
			t.Fatalf("err = %v, want code %s or %s", err, CodeCSRInvalid, CodeKeyUnsupported)
		}
		return false
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("accepted a CSR whose signature does not verify: %v", err)
	}
	if err := CheckKey(csr.PublicKey); err != nil {
		t.Fatalf("accepted a CSR with a refused key: %v", err)
	}
	if _, weak := weakCSRHashes[csr.SignatureAlgorithm]; weak {
		t.Fatalf("accepted a CSR signed with %v", csr.SignatureAlgorithm)
	}
	return true
}
