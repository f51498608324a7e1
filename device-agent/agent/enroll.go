package agent

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unicode"

	"github.com/rs/zerolog"
)

// EnrollOptions are the arguments of `device-agent enroll`.
type EnrollOptions struct {
	ServerURL string // https://host:port of the enrollment server
	Token     string // bootstrap token; never logged
	DeviceID  string // requested id; empty lets the server use the id the token is bound to
	Force     bool   // replace an existing identity
}

// EnrollResult describes the identity after Enroll.
type EnrollResult struct {
	DeviceID        string
	NotAfter        time.Time
	BrokerURL       string
	AlreadyEnrolled bool // nothing was done: the device was enrolled and Force was false
}

// ErrAgentRunning is returned when an operation needs `run` to be stopped.
var ErrAgentRunning = errors.New("device-agent run is active on this state folder; stop it first")

// Enroll pins the CA named by the token, generates a P-256 key, sends a CSR
// and stores key, certificate, CA bundle and broker URL in the state folder.
func Enroll(ctx context.Context, cfg Config, opts EnrollOptions) (EnrollResult, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return EnrollResult{}, err
	}
	tok, err := parseToken(opts.Token)
	if err != nil {
		return EnrollResult{}, err
	}
	base, err := parseServerURL(opts.ServerURL)
	if err != nil {
		return EnrollResult{}, err
	}
	if opts.DeviceID != "" {
		if err := validDeviceID(opts.DeviceID); err != nil {
			return EnrollResult{}, err
		}
	}
	dir := cfg.StateDir
	if err := checkStateOwner(dir, "enroll", os.Geteuid()); err != nil {
		return EnrollResult{}, err
	}
	// The server is checked against the token's CA before the state
	// folder is touched: a wrong --server or a server certificate that
	// does not name the host leaves nothing behind. An enrolled device
	// asked again without --force needs no server for its answer.
	var caCert []*x509.Certificate
	pinCA := func() error {
		if caCert != nil {
			return nil
		}
		return retryEnroll(ctx, cfg, "reaching the enrollment server failed; trying again", func() error {
			var err error
			caCert, err = fetchPinnedCA(ctx, cfg, base, tok.fingerprint)
			return err
		})
	}
	if _, err := os.Stat(filepath.Join(dir, certFile)); opts.Force || err != nil {
		if err := pinCA(); err != nil {
			return EnrollResult{}, err
		}
	}
	if err := ensureStateDir(dir); err != nil {
		return EnrollResult{}, err
	}
	l, err := lock(ctx, filepath.Join(dir, identityLock))
	if err != nil {
		return EnrollResult{}, err
	}
	defer l.unlock()
	removeTemps(dir)

	cur, err := loadIdentity(dir, cfg.Logger)
	switch {
	case err == nil && !opts.Force:
		st, err := readState(dir)
		if errors.Is(err, ErrNotEnrolled) {
			err = errStateMissing // "already enrolled" would leave a device that cannot run
		}
		if err == nil {
			err = st.checkURLs(dir)
		}
		if err != nil {
			return EnrollResult{}, err
		}
		return EnrollResult{DeviceID: cur.deviceID, NotAfter: cur.leaf.NotAfter, BrokerURL: st.BrokerURL, AlreadyEnrolled: true}, nil
	case err != nil && !errors.Is(err, ErrNotEnrolled) && !opts.Force:
		return EnrollResult{}, fmt.Errorf("%w (use --force to enroll again)", err)
	}
	if opts.Force {
		if running, err := isLocked(filepath.Join(dir, runLock)); err != nil || running {
			return EnrollResult{}, cmpErr(err, ErrAgentRunning)
		}
	}

	if err := pinCA(); err != nil {
		return EnrollResult{}, err
	}
	prevID := previousDeviceID(dir, cur) // before the commit replaces cert.pem
	// Saved before the token can be spent: see pendingKey.
	key, err := pendingKey(dir, tok, cfg.Logger)
	if err != nil {
		return EnrollResult{}, err
	}
	var resp certResponse
	err = retryEnroll(ctx, cfg, "enrollment failed; trying again (safe: the same key is sent, and a used token answers with its certificate)", func() error {
		return exchange(ctx, cfg, base, tok, caCert, key, opts.DeviceID, &resp)
	})
	if err != nil {
		return EnrollResult{}, err
	}
	id, brokerURL, err := acceptCertResponse(key, resp, opts.DeviceID)
	if errors.Is(err, errNoChain) {
		err = fmt.Errorf("%w: %s", err, spentTokenAdvice(resp.DeviceID))
	}
	if err != nil {
		return EnrollResult{}, fmt.Errorf("enroll: %w", err)
	}
	if err := commitIdentity(dir, id); err != nil {
		return EnrollResult{}, err
	}
	if err := os.Remove(filepath.Join(dir, pendingKeyFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return EnrollResult{}, fmt.Errorf("remove the enrolled key's pending copy: %w", err)
	}
	if prevID != id.deviceID {
		// Buffered telemetry belongs to the previous device; sent under the
		// new id it would be attributed to the wrong device. A queue whose
		// device cannot be told (certificate and state.json both lost) is
		// dropped too: misattributed readings are worse than missing ones.
		qdir := filepath.Join(dir, queueDir)
		if _, err := os.Stat(qdir); err == nil && cur == nil {
			cfg.Logger.Warn().Str("previous_id", prevID).Str("device_id", id.deviceID).
				Msg("dropping the offline queue of the identity replaced: it is not this device's")
		}
		if err := os.RemoveAll(qdir); err != nil {
			return EnrollResult{}, fmt.Errorf("drop previous device's queue: %w", err)
		}
	}
	now := cfg.Now()
	ss := &stateStore{dir: dir}
	st := State{
		DeviceID:   id.deviceID,
		ServerURL:  base.String(),
		BrokerURL:  brokerURL,
		EnrolledAt: now,
		NotAfter:   id.leaf.NotAfter,
	}
	if prevID == id.deviceID {
		// The queue is kept: so are its counters, until the agent counts
		// again (status showed 0 pending with 28 still queued).
		if old, err := readState(dir); err == nil {
			st.QueuePending, st.QueueDropped, st.QueueCounted = old.QueuePending, old.QueueDropped, old.QueueCounted
		}
	}
	err = ss.replace(ctx, st)
	if err != nil {
		return EnrollResult{}, err
	}
	cfg.Logger.Info().Str("device_id", id.deviceID).Time("not_after", id.leaf.NotAfter).Msg("enrolled")
	return EnrollResult{DeviceID: id.deviceID, NotAfter: id.leaf.NotAfter, BrokerURL: brokerURL}, nil
}

// previousDeviceID is the id of the identity an enrollment replaces: cur's,
// or, when it could not be loaded (a lost key, a broken file), the one its
// certificate or state.json names; "" when none is known.
func previousDeviceID(dir string, cur *identity) string {
	if cur != nil {
		return cur.deviceID
	}
	if b, err := os.ReadFile(filepath.Join(dir, certFile)); err == nil {
		if certs, err := parseCerts(b); err == nil {
			return certs[0].Subject.CommonName
		}
	}
	st, _ := readState(dir)
	return st.DeviceID
}

// retryEnroll runs try until it succeeds or enrollRetry gives up, logging
// msg before each new try.
func retryEnroll(ctx context.Context, cfg Config, msg string, try func() error) error {
	for attempt := 1; ; attempt++ {
		err := try()
		if err == nil {
			return nil
		}
		wait, again := enrollRetry(ctx, cfg, err, attempt)
		if !again {
			return err
		}
		cfg.Logger.Warn().Err(err).Str("retry_in", wait.Round(time.Second).String()).Int("attempt", attempt).Msg(msg)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (gave up: %w)", err, ctx.Err())
		case <-time.After(wait):
		}
	}
}

// exchange sends the CSR for key to the server, trusted through caCert
// (pinned by fetchPinnedCA): the part of an enrollment that may spend the
// token, and may be tried again.
func exchange(ctx context.Context, cfg Config, base *url.URL, tok bootstrapToken, caCert []*x509.Certificate, key crypto.Signer, id string, resp *certResponse) error {
	csrPEM, _, err := makeCSR(key, id)
	if err != nil {
		return err
	}
	c := newServerClient(base, trustedTLS(certPool(caCert), base.Hostname(), nil, cfg.Now), cfg)
	hdr := http.Header{"Authorization": {"Bearer " + tok.raw}}
	if _, err := c.do(ctx, http.MethodPost, "/v1/enroll", "application/pkcs10", hdr, csrPEM, resp); err != nil {
		return fmt.Errorf("enroll: %w", enrollAdvice(err, id))
	}
	c.warnSkew()
	return nil
}

// enrollRetry says whether a failed enrollment exchange is worth another
// try, and after how long: a link that drops or times out, a server
// that is busy (429, 5xx) or restarting. Refusals (4xx), a wrong CA and a
// wrong clock are not. Waits double from EnrollRetryBase, with jitter.
func enrollRetry(ctx context.Context, cfg Config, err error, attempt int) (time.Duration, bool) {
	if attempt >= cfg.EnrollAttempts || ctx.Err() != nil || errors.Is(err, ErrCAMismatch) || classify(err) == failClock {
		return 0, false
	}
	var se *ServerError
	if errors.As(err, &se) {
		if se.Status != http.StatusTooManyRequests && se.Status < 500 {
			return 0, false
		}
		if se.RetryAfter > 0 {
			return se.RetryAfter, true
		}
	} else if !transientNetwork(err) {
		return 0, false
	}
	wait := cfg.EnrollRetryBase << (attempt - 1)
	return wait + time.Duration(cfg.Rand()*float64(wait)/2), true
}

// transientNetwork reports whether err is the link's, not the server's
// answer nor a certificate's: refused, reset, cut short or timed out.
func transientNetwork(err error) bool {
	var ne net.Error
	var ce x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	switch {
	case errors.As(err, &ce), errors.As(err, &ua), errors.As(err, &he):
		return false
	case errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, context.DeadlineExceeded):
		return true
	}
	return false
}

// pendingKey returns the key of an enrollment with tok not yet answered,
// made and saved (0600) before its first request. A retry sends a CSR for
// the same key: the server answers a spent token with the certificate it
// already issued to that key, so an answer lost on the way (a dropped
// cellular link after the server committed) costs a retry, not the token.
// The key is kept for one token only (its fingerprint is in a PEM
// header): another token gets a new key, so that one key is never
// certified as two devices. A key others could read, or one that cannot
// be parsed, is set aside and replaced, with a warning.
func pendingKey(dir string, tok bootstrapToken, log zerolog.Logger) (crypto.Signer, error) {
	path := filepath.Join(dir, pendingKeyFile)
	sum := sha256.Sum256([]byte(tok.raw))
	fp := hex.EncodeToString(sum[:8])
	switch b, fi, err := readPrivate(path); {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("read the enrollment key: %w", err)
	case fi.Mode().Perm()&0o077 != 0:
		log.Warn().Str("file", path).Str("mode", fi.Mode().Perm().String()).
			Msg("the kept enrollment key was readable by others; a new key is made")
	default:
		blk, _ := pem.Decode(b)
		if blk == nil || blk.Headers[pemTokenHeader] != fp {
			break // another token's (or unreadable): a new key
		}
		if k, err := parseKey(b); err == nil {
			return k, nil
		}
		log.Warn().Str("file", path).Msg("the kept enrollment key cannot be parsed; set aside as " + pendingKeyFile + ".bad, a new key is made")
		_ = os.Rename(path, path+".bad")
	}
	k, err := newKey()
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Headers: map[string]string{pemTokenHeader: fp}, Bytes: der})
	if err := writeFileAtomic(path, pemKey, 0o600); err != nil {
		return nil, fmt.Errorf("save the enrollment key: %w", err)
	}
	return k, nil
}

// pemTokenHeader names, in the kept enrollment key's PEM block, the token
// it is kept for: the first 8 bytes of SHA-256 of the token, in hex.
const pemTokenHeader = "Fleetmq-Token"

// readPrivate reads a file and its mode.
func readPrivate(path string) ([]byte, os.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	b, err := io.ReadAll(f)
	return b, fi, err
}

// fetchPinnedCA gets GET /v1/ca over a connection accepted only if the server
// chains to the CA whose DER hashes to fp, and returns that CA certificate.
func fetchPinnedCA(ctx context.Context, cfg Config, base *url.URL, fp [32]byte) ([]*x509.Certificate, error) {
	pc := newServerClient(base, pinnedTLS(fp, base.Hostname(), cfg.Now), cfg)
	bundle, err := pc.do(ctx, http.MethodGet, "/v1/ca", "", nil, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("fetch ca: %w", err)
	}
	cas, err := parseCerts(bundle)
	if err != nil {
		return nil, fmt.Errorf("fetch ca: %w", err)
	}
	for _, c := range cas {
		if sha256.Sum256(c.Raw) == fp {
			return []*x509.Certificate{c}, nil
		}
	}
	return nil, ErrCAMismatch
}

// acceptCertResponse checks an enroll or renew answer against the key that
// signed the CSR and the id asked for (empty: any valid id).
func acceptCertResponse(key crypto.Signer, r certResponse, wantID string) (*identity, string, error) {
	id, err := identityFromKey(key, []byte(r.Certificate), []byte(r.CA))
	if err != nil {
		return nil, "", fmt.Errorf("certificate in answer: %w", err)
	}
	if err := verifiesAgainst(id.leaf, id.caPEM); err != nil {
		return nil, "", err
	}
	if err := validDeviceID(r.DeviceID); err != nil {
		return nil, "", fmt.Errorf("answer: %w", err)
	}
	if id.deviceID != r.DeviceID {
		return nil, "", fmt.Errorf("certificate is for %q, answer says %q", id.deviceID, r.DeviceID)
	}
	if wantID != "" && r.DeviceID != wantID {
		return nil, "", fmt.Errorf("asked for device id %q, got %q", wantID, r.DeviceID)
	}
	broker, err := parseBrokerURL(r.BrokerURL)
	if err != nil {
		return nil, "", err
	}
	return id, broker, nil
}

// parseBrokerURL accepts only TLS schemes: paho silently ignores the TLS
// configuration for tcp://, which would send telemetry in clear.
func parseBrokerURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", fmt.Errorf("broker url: %w", err)
	}
	switch u.Scheme {
	case "mqtts", "ssl", "tls", "tcps":
	default:
		return "", fmt.Errorf("broker url %q: want mqtts://host:port", s)
	}
	if u.Host == "" {
		return "", fmt.Errorf("broker url %q: no host", s)
	}
	return u.String(), nil
}

// validDeviceID rejects ids that cannot be one MQTT topic level. The server
// has the final word on what it accepts.
func validDeviceID(id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("device id must be 1 to 128 characters")
	}
	if strings.ContainsAny(id, "/+#") {
		return fmt.Errorf("device id %q must not contain '/', '+' or '#'", id)
	}
	for _, r := range id {
		if unicode.IsControl(r) || unicode.IsSpace(r) {
			return fmt.Errorf("device id %q must not contain spaces or control characters", id)
		}
	}
	return nil
}

// spentTokenAdvice says what to do when the server issued a certificate
// the agent cannot use: the token is spent, and enrolling again with it
// is answered with the same certificate.
func spentTokenAdvice(id string) string {
	if validDeviceID(id) != nil {
		id = "ID"
	}
	return "the server has used the token for a certificate its CA bundle does not vouch for, and answers " +
		"the token with that certificate again; ask the operator to check the server's CA (fleetmq ca show) " +
		"and for a token that re-provisions this device (fleetmq token create --device " + id + " --reprovision)"
}

// enrollAdvice adds what to do to the enrollment refusals a person can fix.
func enrollAdvice(err error, id string) error {
	var se *ServerError
	if !errors.As(err, &se) {
		return err
	}
	switch {
	case se.Code == codeIDInvalid && id == "":
		return fmt.Errorf("%w: this token is not bound to a device id; name the device with --id", err)
	case se.Code == codeIDMismatch && id != "":
		// The server names the bound id in its message (older ones do not).
		return fmt.Errorf("%w: leave out --id to enroll under the id the token is bound to, "+
			"or ask the operator for a token for %s (fleetmq token create --device %s)", err, id, id)
	case se.Code == codeIDTaken && strings.Contains(se.Message, "revoked"):
		return fmt.Errorf("%w: enroll this device under another id (--id)", err)
	case se.Code == codeIDTaken:
		return fmt.Errorf("%w: ids are for life; use another id, or ask the operator for a token that re-provisions "+
			"this device (fleetmq token create --device ID --reprovision)", err)
	case se.Code == codeIDHasToken:
		// The id is kept for the device a bound token was minted for,
		// which may be this one, given the wrong token.
		return fmt.Errorf("%w: give another id with --id; if this is the device that token was minted for, "+
			"enroll it with that token instead", err)
	case se.Code == codeTokenUnknown:
		// A token mistyped or cut short when pasted, or another fleet's.
		return fmt.Errorf("%w: check the token was pasted whole and is for this server, "+
			"or ask the operator for a new one (fleetmq token create)", err)
	case se.Code == codeTokenExpired || se.Code == codeTokenRevoked:
		return fmt.Errorf("%w: ask the operator for a new token (fleetmq token create; --device ID --reprovision "+
			"if the device exists)", err)
	case se.Code == codeTokenUsed:
		// This device asked with the key it kept for this enrollment: had
		// the token enrolled it, the server would have answered with that
		// certificate.
		return fmt.Errorf("%w: the token enrolled another key (another device, or this one before its state folder was reset); "+
			"ask the operator for a new token (one that re-provisions the device if it exists: fleetmq token create --device ID --reprovision)", err)
	}
	return err
}
