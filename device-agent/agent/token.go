package agent

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

const tokenPrefix = "fmq1"

// ErrTokenFormat is returned for a string that is not a fleetmq bootstrap token.
var ErrTokenFormat = errors.New("malformed token: want fmq1.<secret>.<ca fingerprint>")

// bootstrapToken is a parsed token. The secret travels to the server only;
// the fingerprint pins the CA the agent accepts during enrollment.
type bootstrapToken struct {
	raw         string
	fingerprint [32]byte // SHA-256 of the issuing CA certificate's DER
}

// parseToken checks the shape of a token: fmq1.<43 chars base64url, no
// padding>.<64 lowercase hex chars>. Errors never include the token itself.
func parseToken(s string) (bootstrapToken, error) {
	parts := strings.Split(s, ".")
	if len(parts) != 3 || parts[0] != tokenPrefix {
		return bootstrapToken{}, ErrTokenFormat
	}
	secret, fp := parts[1], parts[2]
	if len(secret) != 43 {
		return bootstrapToken{}, fmt.Errorf("%w: secret must be 43 characters", ErrTokenFormat)
	}
	if _, err := base64.RawURLEncoding.Strict().DecodeString(secret); err != nil {
		return bootstrapToken{}, fmt.Errorf("%w: secret is not base64url", ErrTokenFormat)
	}
	if len(fp) != 64 || strings.ToLower(fp) != fp {
		return bootstrapToken{}, fmt.Errorf("%w: fingerprint must be 64 lowercase hex characters", ErrTokenFormat)
	}
	var t bootstrapToken
	if _, err := hex.Decode(t.fingerprint[:], []byte(fp)); err != nil {
		return bootstrapToken{}, fmt.Errorf("%w: fingerprint is not hex", ErrTokenFormat)
	}
	t.raw = s
	return t, nil
}
