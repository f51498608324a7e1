package enroll

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"
)

// proofBody builds the JSON body of a renewal after expiry: csr (DER) signed
// by signer, whose certificate is leaf, the way a device does it.
func proofBody(tb testing.TB, leaf *x509.Certificate, signer crypto.Signer, csr []byte) []byte {
	tb.Helper()
	var sig []byte
	var err error
	if _, ok := signer.(ed25519.PrivateKey); ok {
		sig, err = signer.Sign(rand.Reader, csr, crypto.Hash(0))
	} else {
		digest := sha256.Sum256(csr)
		sig, err = signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	}
	if err != nil {
		tb.Fatal(err)
	}
	b, err := json.Marshal(RenewProof{
		CSR:         string(csrPEM(csr, "CERTIFICATE REQUEST")),
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})),
		Signature:   base64.StdEncoding.EncodeToString(sig),
	})
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// proofSignatureAlgorithm is how x509 names the signature a proof carries
// for a certificate key of pub's type.
func proofSignatureAlgorithm(pub any) x509.SignatureAlgorithm {
	switch pub.(type) {
	case *ecdsa.PublicKey:
		return x509.ECDSAWithSHA256
	case *rsa.PublicKey:
		return x509.SHA256WithRSA
	case ed25519.PublicKey:
		return x509.PureEd25519
	}
	return x509.UnknownSignatureAlgorithm
}

// FuzzRenewProof fuzzes the JSON body of a renewal after expiry. The
// property: a proof is accepted only if its signature verifies, checked here
// through x509's own signature code rather than verifyProof, with the key of
// the very certificate in the body over the very CSR in the body; and every
// refusal is a client error with a proof-related code.
func FuzzRenewProof(f *testing.F) {
	ca, err := LoadOrCreateCA(CAConfig{Dir: f.TempDir()})
	if err != nil {
		f.Fatal(err)
	}
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		f.Fatal(err)
	}
	next, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	csr := makeCSR(f, next)
	for _, k := range []crypto.Signer{p256, ed, rsaKey} {
		leaf, err := ca.IssueDevice(k.Public(), "dev", time.Hour)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(proofBody(f, leaf, k, csr))
		// Signed by another key than the certificate's.
		f.Add(proofBody(f, leaf, next, csr))
		// A valid proof with its fields reordered, padded, or extended.
		var p map[string]string
		if err := json.Unmarshal(proofBody(f, leaf, k, csr), &p); err != nil {
			f.Fatal(err)
		}
		f.Add([]byte(`{"signature":"` + p["signature"] + `","certificate":` + quote(p["certificate"]) + `,"csr":` + quote(p["csr"]) + `}`))
		f.Add([]byte(`{"csr":` + quote(p["csr"]) + `,"certificate":` + quote(p["certificate"]) + `,"signature":"` + p["signature"] + `","extra":1}`))
		f.Add(append(proofBody(f, leaf, k, csr), []byte(` {}`)...))
		f.Add(append(proofBody(f, leaf, k, csr), '}'))
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"csr":"","certificate":"","signature":""}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, body []byte) {
		leaf, req, err := parseProof(body)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("err = %v, not an *Error", err)
			}
			switch e.Code {
			case CodeBadRequest, CodeCSRInvalid, CodeKeyUnsupported, CodeCertInvalid, CodeProofInvalid:
			default:
				t.Fatalf("refused with code %s: %v", e.Code, err)
			}
			if StatusOf(e.Code) < 400 || StatusOf(e.Code) >= 500 {
				t.Fatalf("refusal %s is not a client error", e.Code)
			}
			return
		}
		var p RenewProof
		if err := json.Unmarshal(body, &p); err != nil {
			t.Fatalf("accepted a body encoding/json refuses: %v", err)
		}
		block, _ := pem.Decode([]byte(p.Certificate))
		if block == nil || string(block.Bytes) != string(leaf.Raw) {
			t.Fatal("the accepted certificate is not the one in the body")
		}
		again, err := ParseCSR([]byte(p.CSR))
		if err != nil || string(again.Raw) != string(req.Raw) {
			t.Fatalf("the accepted CSR is not the one in the body (%v)", err)
		}
		if err := req.CheckSignature(); err != nil {
			t.Fatalf("accepted a CSR whose self-signature fails: %v", err)
		}
		if err := CheckKey(req.PublicKey); err != nil {
			t.Fatalf("accepted a CSR with a refused key: %v", err)
		}
		sig, err := base64.StdEncoding.DecodeString(p.Signature)
		if err != nil {
			t.Fatalf("accepted a signature that is not base64: %v", err)
		}
		alg := proofSignatureAlgorithm(leaf.PublicKey)
		if err := leaf.CheckSignature(alg, req.Raw, sig); err != nil {
			t.Fatalf("accepted a proof whose signature does not verify with the certificate's key over the CSR: %v", err)
		}
	})
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// TestRenewProofRefusesWrongSigner pins the property the fuzzer checks on
// known inputs: the right key is accepted, another key, another CSR and a
// truncated signature are not.
func TestRenewProofRefusesWrongSigner(t *testing.T) {
	ca, err := LoadOrCreateCA(CAConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf, err := ca.IssueDevice(&key.PublicKey, "dev", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	csr := makeCSR(t, other)
	if _, _, err := parseProof(proofBody(t, leaf, key, csr)); err != nil {
		t.Fatalf("valid proof refused: %v", err)
	}
	_, _, err = parseProof(proofBody(t, leaf, other, csr))
	wantCode(t, err, CodeProofInvalid)

	// The certificate may come with its chain (the PEM answer of
	// /v1/enroll, saved as is), but nothing else may follow it.
	var p RenewProof
	for _, tc := range []struct {
		tail string
		ok   bool
	}{
		{string(ca.ChainPEM()), true},
		{string(ca.ChainPEM()) + "\n\n", true},
		{"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", false},
		{"trailing text", false},
	} {
		if err := json.Unmarshal(proofBody(t, leaf, key, csr), &p); err != nil {
			t.Fatal(err)
		}
		p.Certificate += tc.tail
		b, _ := json.Marshal(p)
		got, _, err := parseProof(b)
		switch {
		case tc.ok && (err != nil || !got.Equal(leaf)):
			t.Errorf("certificate followed by %q: %v", tc.tail, err)
		case !tc.ok:
			wantCode(t, err, CodeCertInvalid)
		}
	}

	// A signature over one CSR does not vouch for another.
	if err := json.Unmarshal(proofBody(t, leaf, key, csr), &p); err != nil {
		t.Fatal(err)
	}
	p.CSR = string(csrPEM(makeCSR(t, other), "CERTIFICATE REQUEST"))
	b, _ := json.Marshal(p)
	_, _, err = parseProof(b)
	wantCode(t, err, CodeProofInvalid)

	if err := json.Unmarshal(proofBody(t, leaf, key, csr), &p); err != nil {
		t.Fatal(err)
	}
	p.Signature = p.Signature[:len(p.Signature)-8] + strings.Repeat("A", 8)
	b, _ = json.Marshal(p)
	_, _, err = parseProof(b)
	wantCode(t, err, CodeProofInvalid)
}
