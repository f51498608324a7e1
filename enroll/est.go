package enroll

import (
	"bytes"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"fmt"
	"net/http"
	"reflect"
	"strings"

	"github.com/smallstep/pkcs7"

	"github.com/fleetmq/fleetmq/store"
)

// EST (Enrollment over Secure Transport, RFC 7030) lets device stacks that
// already speak it enroll without our agent. It is a second front end to the
// same flows as /v1/enroll and /v1/renew: same token, CSR and id rules, same
// failure rate limit, audit records and error codes (except that a request
// without credentials, waiting for the Basic challenge, counts as no
// failure). Only the framing differs: base64 DER in and out, and plain-text
// errors.
//
// Paths, each also served under an optional CA label
// (/.well-known/est/<label>/<operation>):
//
//	GET  cacerts         the CA chain, PKCS#7 certs-only
//	GET  csrattrs        what the CA wants in a CSR
//	POST simpleenroll    bootstrap token (HTTP Basic password or Bearer)
//	POST simplereenroll  current client certificate in the TLS handshake
//
// The label is accepted and ignored: fleetmq has one CA and one certificate
// profile, so every label names the same thing. Accepting it lets a client
// whose configuration insists on a label enroll anyway; refusing it would gain
// nothing, since no label could grant more than the token or certificate does.
//
// Not implemented (404): serverkeygen, because a private key must never leave
// the device, and fullcmc. Nothing is ever answered 202: enrollment is
// decided at once.

const (
	estRoot   = "/.well-known/est"
	estPrefix = estRoot + "/"
	// estRealm is the Basic challenge on a 401 that a bootstrap token cures.
	estRealm = `Basic realm="fleetmq est"`
)

// estBase64 rejects non-zero trailing bits and missing padding, so that an
// accepted body has exactly one encoding (modulo white space).
var estBase64 = base64.StdEncoding.Strict()

// OIDs named in the csrattrs answer.
var (
	oidECPublicKey     = asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}
	oidP256            = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidSubjectAltName  = asn1.ObjectIdentifier{2, 5, 29, 17}
)

func isESTPath(p string) bool { return p == estRoot || strings.HasPrefix(p, estPrefix) }

// registerEST adds the EST endpoints to the handler's mux. The CA is
// immutable, so the two static answers are encoded once here.
func (h *Handler) registerEST() error {
	var chain []byte
	for _, c := range h.cfg.CA.Chain() {
		chain = append(chain, c.Raw...)
	}
	cacerts, err := pkcs7.DegenerateCertificate(chain)
	if err != nil {
		return fmt.Errorf("enroll: encode EST cacerts: %w", err)
	}
	attrs, err := csrAttrs()
	if err != nil {
		return fmt.Errorf("enroll: encode EST csrattrs: %w", err)
	}
	serveCACerts := func(w http.ResponseWriter, r *http.Request) {
		writeESTBody(w, "application/pkcs7-mime", cacerts)
	}
	serveCSRAttrs := func(w http.ResponseWriter, r *http.Request) {
		writeESTBody(w, "application/csrattrs", attrs)
	}
	for _, prefix := range []string{estPrefix, estPrefix + "{label}/"} {
		h.mux.HandleFunc("GET "+prefix+"cacerts", serveCACerts)
		h.mux.HandleFunc("GET "+prefix+"csrattrs", serveCSRAttrs)
		h.mux.HandleFunc("POST "+prefix+"simpleenroll", h.serveESTEnroll)
		h.mux.HandleFunc("POST "+prefix+"simplereenroll", h.serveESTReenroll)
	}
	return nil
}

// csrAttrs encodes RFC 7030 §4.5.2 CsrAttrs (SEQUENCE OF AttrOrOID): an
// ECDSA key on P-256, signed with ECDSA and SHA-256. It states a preference;
// ParseCSR still accepts every key CheckKey allows.
func csrAttrs() ([]byte, error) {
	type attribute struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.ObjectIdentifier `asn1:"set"`
	}
	key, err := asn1.Marshal(attribute{Type: oidECPublicKey, Values: []asn1.ObjectIdentifier{oidP256}})
	if err != nil {
		return nil, err
	}
	sig, err := asn1.Marshal(oidECDSAWithSHA256)
	if err != nil {
		return nil, err
	}
	return asn1.Marshal([]asn1.RawValue{{FullBytes: key}, {FullBytes: sig}})
}

func (h *Handler) serveESTEnroll(w http.ResponseWriter, r *http.Request) {
	h.attempt(w, r, OpEnroll, "est", func(remote string) (*x509.Certificate, store.AuditEvent, error) {
		return h.estEnroll(r, remote)
	}, func(cert *x509.Certificate, _ bool) { h.writeESTCert(w, r, cert) })
}

// estEnroll is /v1/enroll with EST framing. It returns the audit fields
// that identify a failed attempt (see checkToken).
func (h *Handler) estEnroll(r *http.Request, remote string) (*x509.Certificate, store.AuditEvent, error) {
	secret, err := estToken(r)
	if err != nil {
		return nil, store.AuditEvent{}, err
	}
	tok, who, tokErr := h.checkToken(r.Context(), secret)
	spent := spentToken(tok, tokErr)
	if tokErr != nil && !spent {
		return nil, who, tokErr
	}
	csr, err := readESTCSR(r)
	if err != nil {
		return nil, who, err
	}
	return h.enrollOrRepeat(r.Context(), tok, tokErr, csr, remote, who)
}

func (h *Handler) serveESTReenroll(w http.ResponseWriter, r *http.Request) {
	h.attempt(w, r, OpRenew, "est", func(remote string) (*x509.Certificate, store.AuditEvent, error) {
		cert, id, err := h.estReenroll(r, remote)
		return cert, store.AuditEvent{DeviceID: id}, err
	}, func(cert *x509.Certificate, _ bool) { h.writeESTCert(w, r, cert) })
}

// estReenroll is /v1/renew with EST framing and RFC 7030's subject rule. The
// certificate must come in the TLS handshake, which proves possession of its
// key; the JSON proof of /v1/renew has no EST equivalent. Expired
// certificates within RenewGrace are accepted as on /v1/renew.
func (h *Handler) estReenroll(r *http.Request, remote string) (*x509.Certificate, string, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return nil, "", Errorf(CodeCertRequired, "simplereenroll needs the current client certificate in the TLS handshake")
	}
	leaf := r.TLS.PeerCertificates[0]
	csr, err := readESTCSR(r)
	if err != nil {
		// The certificate is not verified yet: its CN is no device id.
		return nil, "", err
	}
	return h.renewCert(r.Context(), leaf, csr, remote, sameSubject)
}

// sameSubject is RFC 7030 §4.2.2: "The request Subject field and
// SubjectAltName extension MUST be identical to the corresponding fields in
// the certificate being renewed/rekeyed." The ChangeSubjectName attribute the
// RFC allows is not supported: a device id never changes. A refusal is
// CodeIDMismatch, 403: the client is authenticated, but not for the subject
// it asks for.
func sameSubject(leaf *x509.Certificate, csr *x509.CertificateRequest) error {
	if !sameName(leaf.RawSubject, csr.RawSubject) {
		return Errorf(CodeIDMismatch, "the CSR subject must be identical to the current certificate's subject (RFC 7030 section 4.2.2); a device id never changes")
	}
	if !bytes.Equal(extensionValue(leaf.Extensions, oidSubjectAltName), extensionValue(csr.Extensions, oidSubjectAltName)) {
		return Errorf(CodeIDMismatch, "the CSR subjectAltName must be identical to the current certificate's (RFC 7030 section 4.2.2)")
	}
	return nil
}

// sameName compares two DER names attribute by attribute, in order. Values
// are compared after decoding, so a CN encoded as UTF8String (OpenSSL's
// default) equals the same text as PrintableString (Go's).
func sameName(a, b []byte) bool {
	var na, nb pkix.RDNSequence
	if rest, err := asn1.Unmarshal(a, &na); err != nil || len(rest) != 0 {
		return false
	}
	if rest, err := asn1.Unmarshal(b, &nb); err != nil || len(rest) != 0 {
		return false
	}
	if len(na) != len(nb) {
		return false
	}
	for i := range na {
		if len(na[i]) != len(nb[i]) {
			return false
		}
		for j := range na[i] {
			if !na[i][j].Type.Equal(nb[i][j].Type) || !reflect.DeepEqual(na[i][j].Value, nb[i][j].Value) {
				return false
			}
		}
	}
	return true
}

func extensionValue(exts []pkix.Extension, id asn1.ObjectIdentifier) []byte {
	for _, e := range exts {
		if e.Id.Equal(id) {
			return e.Value
		}
	}
	return nil
}

// estToken returns the bootstrap token of an EST request: the password of
// HTTP Basic credentials (RFC 7030 §3.2.3; the user name is ignored, since the
// token alone decides the device id) or a Bearer token.
func estToken(r *http.Request) (string, error) {
	const how = "send the bootstrap token as the HTTP Basic password (any user name) or as 'Authorization: Bearer <token>'"
	scheme, rest, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	switch {
	case strings.EqualFold(scheme, "Basic"):
		_, pass, ok := r.BasicAuth()
		if !ok {
			return "", Errorf(CodeTokenInvalid, "malformed HTTP Basic credentials; %s", how)
		}
		if pass == "" {
			return "", Errorf(CodeTokenMissing, "%s", how)
		}
		return pass, nil
	case strings.EqualFold(scheme, "Bearer") && rest != "":
		return rest, nil
	}
	return "", Errorf(CodeTokenMissing, "%s", how)
}

// readESTCSR reads an EST certification request: Content-Type
// application/pkcs10, body the base64 of a DER PKCS#10 request.
func readESTCSR(r *http.Request) (*x509.CertificateRequest, error) {
	mt, err := mediaType(r)
	if err != nil {
		return nil, err
	}
	if mt != "application/pkcs10" {
		return nil, Errorf(CodeUnsupportedMedia, "content type %q is not a CSR; use application/pkcs10", truncate(mt, 64))
	}
	body, err := readBody(r)
	if err != nil {
		return nil, err
	}
	return decodeESTCSR(body)
}

// decodeESTCSR decodes an EST request body: standard base64 with padding,
// white space (including CRLF line breaks) allowed anywhere, of a DER
// PKCS#10 request whose key and signature ParseCSR accepts. Everything else
// is refused, in particular PEM: a lenient decoder skipping the characters
// outside the alphabet would turn a "-----BEGIN" line into garbage bytes in
// front of the CSR rather than refuse it. Errors are *Error with
// CodeCSRInvalid or CodeKeyUnsupported.
func decodeESTCSR(body []byte) (*x509.CertificateRequest, error) {
	if bytes.HasPrefix(bytes.TrimLeft(body, " \t\r\n"), []byte("-----BEGIN")) {
		return nil, Errorf(CodeCSRInvalid, "body is PEM; EST wants the base64 of the DER CSR without the -----BEGIN/-----END lines (e.g. openssl req -outform DER | base64)")
	}
	clean := make([]byte, 0, len(body))
	for i, c := range body {
		switch {
		case isBase64Std(c):
			clean = append(clean, c)
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
		default:
			return nil, Errorf(CodeCSRInvalid, "body is not base64: byte %d is outside the base64 alphabet; send the DER CSR base64-encoded", i+1)
		}
	}
	if len(clean) == 0 {
		return nil, Errorf(CodeCSRInvalid, "body is empty; send the DER CSR base64-encoded")
	}
	der := make([]byte, estBase64.DecodedLen(len(clean)))
	n, err := estBase64.Decode(der, clean)
	if err != nil {
		return nil, &Error{Code: CodeCSRInvalid, Message: "body is not valid base64 (padding, length or trailing bits)", Err: err}
	}
	der = der[:n]
	// A DER request is a SEQUENCE. Checking it here keeps ParseCSR, which
	// also takes PEM, from accepting the base64 of a PEM file.
	if len(der) == 0 || der[0] != 0x30 {
		return nil, Errorf(CodeCSRInvalid, "body does not decode to a DER PKCS#10 request")
	}
	return ParseCSR(der)
}

func isBase64Std(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '+' || c == '/' || c == '='
}

// writeESTCert answers an enrollment with a certs-only PKCS#7 holding only
// the issued certificate (RFC 7030 §4.2.3); the chain is in cacerts.
func (h *Handler) writeESTCert(w http.ResponseWriter, r *http.Request, cert *x509.Certificate) {
	der, err := pkcs7.DegenerateCertificate(cert.Raw)
	if err != nil {
		h.writeError(w, r, fmt.Errorf("encode EST certificate: %w", err))
		return
	}
	writeESTBody(w, "application/pkcs7-mime; smime-type=certs-only", der)
}

// writeESTBody writes der as base64 in lines of 64 characters. RFC 7030
// declares the encoding with Content-Transfer-Encoding; RFC 8951 says
// clients should not depend on the header, so both get what they expect.
func writeESTBody(w http.ResponseWriter, contentType string, der []byte) {
	enc := base64.StdEncoding.EncodeToString(der)
	var b bytes.Buffer
	b.Grow(len(enc) + len(enc)/64 + 1)
	for len(enc) > 64 {
		b.WriteString(enc[:64])
		b.WriteByte('\n')
		enc = enc[64:]
	}
	b.WriteString(enc)
	b.WriteByte('\n')
	hdr := w.Header()
	hdr.Set("Content-Type", contentType)
	hdr.Set("Content-Transfer-Encoding", "base64")
	hdr.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	w.Write(b.Bytes())
}

// writeESTError writes e the RFC 7030 §4.2.3 way: the status of its code
// and a plain-text body, "<code>: <message>", so that the stable code is
// there for scripts and the message for people.
func writeESTError(w http.ResponseWriter, e *Error) {
	hdr := w.Header()
	setRetryAfter(hdr, e)
	if tokenCode(e.Code) {
		hdr.Set("WWW-Authenticate", estRealm)
	}
	hdr.Set("Content-Type", "text/plain; charset=utf-8")
	hdr.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(e.Status())
	fmt.Fprintf(w, "%s: %s\n", e.Code, e.Message)
}

// tokenCode reports whether code is a 401 that another bootstrap token
// would cure, the ones answered with a Basic challenge. A certificate 401
// on simplereenroll gets none: no HTTP credentials are accepted there.
func tokenCode(code Code) bool {
	switch code {
	case CodeTokenMissing, CodeTokenInvalid, CodeTokenUnknown, CodeTokenExpired, CodeTokenUsed, CodeTokenRevoked:
		return true
	}
	return false
}
