package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Public error codes of the enrollment server that the agent branches on.
const (
	codeTokenExpired  = "token_expired"
	codeTokenUsed     = "token_used"
	codeTokenRevoked  = "token_revoked"
	codeTokenUnknown  = "token_unknown"
	codeCertExpired   = "cert_expired"
	codeCertRevoked   = "cert_revoked"
	codeCertInvalid   = "cert_invalid"
	codeDeviceRevoked = "device_revoked"
	codeRateLimited   = "rate_limited"
	codeIDInvalid     = "id_invalid"
	codeIDTaken       = "id_taken"
	codeIDHasToken    = "id_has_token"
	codeIDMismatch    = "id_mismatch"
)

// ErrCAMismatch is returned when the enrollment server does not present the
// CA pinned by the token's fingerprint.
var ErrCAMismatch = errors.New("CA fingerprint mismatch: the server is not the one the token was issued for")

// ServerError is an error answer of the enrollment server.
type ServerError struct {
	Status     int
	Code       string
	Message    string
	RetryAfter time.Duration // from Retry-After (429, 503)
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("server answered %d %s: %s", e.Status, e.Code, e.Message)
}

// Revoked reports whether the server revoked the certificate or the device.
func (e *ServerError) Revoked() bool {
	return e.Code == codeCertRevoked || e.Code == codeDeviceRevoked
}

// ClockError says the local clock is too far from the server's.
type ClockError struct {
	Skew time.Duration // local minus server
	Err  error         // what failed because of it, if anything
}

func (e *ClockError) Error() string {
	msg := "the server's certificate is not valid at the local time, so the local clock is probably wrong"
	if e.Skew != 0 {
		msg = fmt.Sprintf("local clock is %s off the server's time", e.Skew.Round(time.Second))
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *ClockError) Unwrap() error { return e.Err }

// certResponse is the JSON answer of /v1/enroll and /v1/renew.
type certResponse struct {
	DeviceID    string    `json:"device_id"`
	Certificate string    `json:"certificate"`
	CA          string    `json:"ca"`
	NotAfter    time.Time `json:"not_after"`
	BrokerURL   string    `json:"broker_url"`
}

// maxResponse bounds what the agent reads from the server.
const maxResponse = 1 << 20

// serverClient talks HTTPS to the enrollment server. It is a deliberately
// small HTTP/1.1 client, one connection per request: net/http's Client and
// Transport (pooling, HTTP/2, proxies) add about 0.5 MB to a binary meant
// for a Pi Zero, and a handful of requests a month need none of it.
type serverClient struct {
	base    *url.URL
	tls     *tls.Config
	timeout time.Duration
	now     func() time.Time
	maxSkew time.Duration
	log     zerolog.Logger
	// lastSkew is local minus server time at the last 2xx answer.
	lastSkew time.Duration
}

// parseServerURL accepts only https URLs; anything after the host is kept as
// a path prefix.
func parseServerURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("server url: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("server url %q: want https://host[:port]", s)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawQuery, u.Fragment = "", ""
	return u, nil
}

func newServerClient(base *url.URL, tlsConf *tls.Config, cfg Config) *serverClient {
	return &serverClient{base: base, tls: tlsConf, timeout: cfg.HTTPTimeout, now: cfg.Now, maxSkew: cfg.MaxClockSkew, log: cfg.Logger}
}

// roundTrip sends req on a new TLS connection and returns the answer with
// its body read (at most maxResponse bytes).
func (c *serverClient) roundTrip(ctx context.Context, req *http.Request) (*http.Response, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	addr := c.base.Host
	if c.base.Port() == "" {
		addr = net.JoinHostPort(c.base.Hostname(), "443")
	}
	d := tls.Dialer{Config: c.tls}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, hostAdvice(err, c.base.Hostname())
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req.Close = true
	if err := req.Write(conn); err != nil {
		return nil, nil, cmpErr(ctx.Err(), err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return nil, nil, cmpErr(ctx.Err(), err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, nil, cmpErr(ctx.Err(), fmt.Errorf("read answer: %w", err))
	}
	return resp, b, nil
}

// hostAdvice says what to do when the server's certificate does not name
// the host the device was given: the commonest set-up mistake, and
// x509's wording alone does not point at the server's flag.
func hostAdvice(err error, host string) error {
	var he x509.HostnameError
	if !errors.As(err, &he) {
		return err
	}
	return fmt.Errorf("%w; the server's certificate does not name %s: start fleetmq with --hostname %s, or use a name it has", err, host, host)
}

// pinnedTLS accepts a server only if its presented chain contains the CA
// whose DER hashes to fp and the leaf verifies against that CA for host. No
// other root is trusted, so the system trust store plays no part.
func pinnedTLS(fp [32]byte, host string, now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: host,
		// The standard verification is replaced, not skipped: VerifyConnection
		// below runs on every handshake, resumed ones included.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			var ca *x509.Certificate
			for _, c := range cs.PeerCertificates {
				if sha256.Sum256(c.Raw) == fp {
					ca = c
					break
				}
			}
			if ca == nil && len(cs.PeerCertificates) == 1 {
				// fleetmq's enrollment listener sends its CA with its
				// certificate; its MQTT listener does not.
				return fmt.Errorf("%w (this server sent no CA at all: is --server the enrollment address, port 8443 by default, not the MQTT one?)", ErrCAMismatch)
			}
			if ca == nil {
				return ErrCAMismatch
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				Roots:         certPool([]*x509.Certificate{ca}),
				Intermediates: inter,
				DNSName:       host,
				CurrentTime:   now(),
			})
			if err != nil {
				return fmt.Errorf("verify server against pinned CA: %w", err)
			}
			return nil
		},
	}
}

// trustedTLS verifies the server against the fleet CA bundle, presenting
// cert (if not nil) as client certificate.
func trustedTLS(roots *x509.CertPool, host string, cert *tls.Certificate, now func() time.Time) *tls.Config {
	conf := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: host,
		RootCAs:    roots,
		Time:       now,
	}
	if cert != nil {
		conf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, nil
		}
	}
	return conf
}

// do sends a request and decodes a 2xx JSON answer into out (if not nil) or
// returns a *ServerError. A Date header far from the local clock turns an
// error into a *ClockError wrapping it: the clock is the likelier cause.
func (c *serverClient) do(ctx context.Context, method, path, contentType string, header http.Header, body []byte, out any) ([]byte, error) {
	u := *c.base
	u.Path += path
	req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Accept", "application/json")
	resp, b, err := c.roundTrip(ctx, req)
	if err != nil {
		if clockLikely(err) {
			return nil, &ClockError{Err: err}
		}
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	skew := c.skew(resp.Header.Get("Date"))
	if resp.StatusCode/100 != 2 {
		se := &ServerError{Status: resp.StatusCode, Code: "http_" + strconv.Itoa(resp.StatusCode), Message: http.StatusText(resp.StatusCode)}
		var e struct{ Code, Message string }
		if json.Unmarshal(b, &e) == nil && e.Code != "" {
			se.Code, se.Message = e.Code, e.Message
		}
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			se.RetryAfter = time.Duration(s) * time.Second
		}
		if abs(skew) > c.maxSkew {
			return nil, &ClockError{Skew: skew, Err: se}
		}
		return nil, se
	}
	c.lastSkew = skew
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return nil, fmt.Errorf("%s %s: decode answer: %w", method, path, err)
		}
	}
	return b, nil
}

// warnSkew logs the clock skew seen on the last success if it is beyond
// MaxClockSkew. The request went through (the certificates' dates allowed
// it), but a clock this far off stamps every reading wrong and moves the
// renewal: a Pi without a real-time clock keeps the time it had at
// shutdown until NTP answers.
func (c *serverClient) warnSkew() {
	if abs(c.lastSkew) > c.maxSkew {
		c.log.Warn().Str("skew", c.lastSkew.Round(time.Minute).String()).
			Msg("the local clock differs from the server's (local minus server); telemetry times are off and renewals mistimed until it is fixed: enable time sync (timedatectl set-ntp true)")
	}
}

// skew is local minus server time, or 0 without a usable Date header.
func (c *serverClient) skew(date string) time.Duration {
	if date == "" {
		return 0
	}
	t, err := http.ParseTime(date)
	if err != nil {
		return 0
	}
	return c.now().Sub(t)
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// clockLikely reports whether a TLS failure came from certificate validity
// dates, which with a sane server means the local clock is wrong.
func clockLikely(err error) bool {
	var inv x509.CertificateInvalidError
	if errors.As(err, &inv) && inv.Reason == x509.Expired {
		return true
	}
	return strings.Contains(err.Error(), "certificate has expired or is not yet valid")
}

// authRejected reports whether the peer refused our client certificate
// during the TLS handshake (its alert arrives as a "remote error").
func authRejected(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	if !strings.Contains(s, "remote error: tls:") {
		return false
	}
	for _, alert := range []string{"bad certificate", "certificate required", "revoked certificate",
		"expired certificate", "unknown certificate", "unsupported certificate", "access denied"} {
		if strings.Contains(s, alert) {
			return true
		}
	}
	return false
}

// caAdvice adds what to do to a server certificate from a CA the device
// does not trust: retrying does not mend it, and x509's "signed by unknown
// authority" alone does not say why it happens.
func caAdvice(err error) error {
	var ua x509.UnknownAuthorityError
	if !errors.As(err, &ua) {
		return err
	}
	return fmt.Errorf("%w; the server's certificate is not from the fleet CA in ca.pem: the server was set up "+
		"again with a new CA, or another server answers at this address; if the fleet has a new CA, %s", err, adviceReenroll)
}
