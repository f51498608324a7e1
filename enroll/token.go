package enroll

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
)

const (
	tokenPrefix    = "fmq1"
	tokenSecretLen = 32
	tokenSecretB64 = 43 // base64.RawURLEncoding.EncodedLen(tokenSecretLen)
	tokenFPHex     = 2 * sha256.Size
	tokenLen       = len(tokenPrefix) + 1 + tokenSecretB64 + 1 + tokenFPHex
)

// tokenEncoding rejects non-zero trailing bits so that a secret has exactly
// one encoding.
var tokenEncoding = base64.RawURLEncoding.Strict()

// ParsedToken is what a bootstrap token carries once parsed. The secret itself
// is not kept: only its hash is ever compared or stored.
//
// A bootstrap token is one line of ASCII, 113 characters long:
//
//	fmq1.<secret>.<fingerprint>
//
// where:
//
//   - fmq1 is the format version.
//   - secret is 32 random bytes, base64url without padding (43 characters).
//   - fingerprint is the SHA-256 of the issuing CA certificate (DER),
//     lowercase hex (64 characters): the value printed by
//     `openssl x509 -noout -fingerprint -sha256 -in ca.pem` without the
//     colons, in lower case. A device pins the CA with it on first contact,
//     before it has any other way to trust the server.
//
// The server stores only SHA-256 of the 32 secret bytes, so a stolen
// database does not yield usable tokens. The public token id, shown in
// listings and audit records, is the hex of the first 6 bytes of that hash
// (see TokenID).
//
// Parsing is strict: no surrounding white space, no padding, no upper-case
// hex, exactly three dot-separated parts. An accepted token therefore has
// exactly one spelling.
type ParsedToken struct {
	Hash          [32]byte // SHA-256 of the secret bytes; the store's key
	CAFingerprint [32]byte // SHA-256 of the issuing CA certificate DER
}

// NewToken returns a new bootstrap token for the CA with the given
// fingerprint, and the hash to store for it. The token is shown to the
// operator once; it cannot be rebuilt from the hash.
func NewToken(caFingerprint [32]byte) (token string, hash [32]byte, err error) {
	var secret [tokenSecretLen]byte
	if _, err := rand.Read(secret[:]); err != nil {
		return "", hash, fmt.Errorf("generate token secret: %w", err)
	}
	return formatToken(secret[:], caFingerprint), sha256.Sum256(secret[:]), nil
}

func formatToken(secret []byte, caFingerprint [32]byte) string {
	return tokenPrefix + "." + tokenEncoding.EncodeToString(secret) + "." + hex.EncodeToString(caFingerprint[:])
}

// ParseToken parses a bootstrap token. Errors are *Error with
// CodeTokenInvalid; they say what is wrong with the shape of the token and
// never contain any of its text, since a malformed token may still be most of
// a valid secret.
func ParseToken(s string) (ParsedToken, error) {
	var pt ParsedToken
	if s == "" {
		return pt, Errorf(CodeTokenInvalid, "token is empty")
	}
	// Checked before splitting so that a huge input costs nothing.
	if len(s) != tokenLen {
		return pt, Errorf(CodeTokenInvalid, "token must be %d characters long, got %d", tokenLen, len(s))
	}
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return pt, Errorf(CodeTokenInvalid, "token must have 3 dot-separated parts, got %d", len(parts))
	}
	if parts[0] != tokenPrefix {
		return pt, Errorf(CodeTokenInvalid, "token must start with %q", tokenPrefix+".")
	}
	secretText, fpText := parts[1], parts[2]
	if len(secretText) != tokenSecretB64 {
		return pt, Errorf(CodeTokenInvalid, "token secret must be %d characters, got %d", tokenSecretB64, len(secretText))
	}
	// The decoder silently skips '\r' and '\n'; checking the alphabet first
	// keeps the encoding unique.
	for i := 0; i < len(secretText); i++ {
		if !isBase64URL(secretText[i]) {
			return pt, Errorf(CodeTokenInvalid, "token secret is not base64url at position %d", i+1)
		}
	}
	secret, err := tokenEncoding.DecodeString(secretText)
	if err != nil || len(secret) != tokenSecretLen {
		return pt, Errorf(CodeTokenInvalid, "token secret is not %d bytes of unpadded base64url", tokenSecretLen)
	}
	if len(fpText) != tokenFPHex {
		return pt, Errorf(CodeTokenInvalid, "token CA fingerprint must be %d hex characters, got %d", tokenFPHex, len(fpText))
	}
	for i := 0; i < len(fpText); i++ {
		c := fpText[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return pt, Errorf(CodeTokenInvalid, "token CA fingerprint is not lowercase hex at position %d", i+1)
		}
	}
	if _, err := hex.Decode(pt.CAFingerprint[:], []byte(fpText)); err != nil {
		return ParsedToken{}, Errorf(CodeTokenInvalid, "token CA fingerprint is not lowercase hex")
	}
	pt.Hash = sha256.Sum256(secret)
	return pt, nil
}

func isBase64URL(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// TokenID is the public id of the token with the given hash: safe to show,
// log and store in audit records.
func TokenID(hash [32]byte) string {
	return hex.EncodeToString(hash[:6])
}
