package admin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// SocketName is the admin socket's file name inside the data folder.
const SocketName = "admin.sock"

// ErrNotRunning means no server answers on the admin socket.
var ErrNotRunning = errors.New("the fleetmq server is not running (no admin socket answers)")

// ErrNoAnswer means the request may have reached the server but no
// complete answer came back (the server stopped, the connection broke): a
// change asked for may have been made all the same.
var ErrNoAnswer = errors.New("the server did not answer")

// DefaultTimeout is how long a client waits for the server to accept a
// connection, and then for the start of its answer.
const DefaultTimeout = 30 * time.Second

// Client talks to a running server's admin API over its unix socket.
type Client struct {
	socket  string
	timeout time.Duration
	hc      *http.Client
}

// NewClient returns a client for the socket at path that waits
// DefaultTimeout.
func NewClient(path string) *Client { return NewClientTimeout(path, DefaultTimeout) }

// NewClientTimeout returns a client for the socket at path that waits up
// to timeout (0: DefaultTimeout) for the server to accept a connection,
// and as long again for the status line of each answer: an overloaded or
// wedged server is reported rather than waited for forever. The body is
// not timed, so a backup or a followed telemetry stream, which start
// answering at once, run for as long as they take.
func NewClientTimeout(path string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{
		socket:  path,
		timeout: timeout,
		hc: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				d := net.Dialer{Timeout: timeout}
				return d.DialContext(ctx, "unix", path)
			},
			ResponseHeaderTimeout: timeout,
		}},
	}
}

// APIError is an error answer from the server.
type APIError struct {
	Status  int
	Code    enroll.Code `json:"code"`
	Message string      `json:"message"`
}

func (e *APIError) Error() string { return fmt.Sprintf("%s (%s)", e.Message, e.Code) }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		// The status said done; the rest of the answer is lost.
		return fmt.Errorf("decode %s %s answer: %w: %w", method, path, ErrNoAnswer, err)
	}
	return nil
}

func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://fleetmq"+path, body)
	if err != nil {
		return nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, c.failed(err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		apiErr := &APIError{Status: resp.StatusCode}
		if json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(apiErr) != nil || apiErr.Code == "" {
			apiErr.Code, apiErr.Message = enroll.CodeInternal, resp.Status
		}
		return nil, apiErr
	}
	return resp, nil
}

// failed says why a request got no answer, and whether it may have reached
// the server (ErrNoAnswer): a caller that cannot tell would have to assume
// the server acted on it.
func (c *Client) failed(err error) error {
	dir := filepath.Dir(c.socket)
	if fi, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
		return fmt.Errorf("no data folder %s: give the server's with --data or FLEETMQ_DATA", dir)
	} else if serr == nil && !fi.IsDir() {
		return fmt.Errorf("%s is not a folder: give the server's data folder with --data or FLEETMQ_DATA", dir)
	}
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%w: %s", ErrNotRunning, c.socket)
	}
	ne := net.Error(nil)
	// EAGAIN, a full accept queue, is a timeout too.
	timedOut := errors.As(err, &ne) && ne.Timeout()
	const check = "it may be overloaded or stuck: check its log (journalctl -u fleetmq) and /readyz"
	if op := (*net.OpError)(nil); errors.As(err, &op) && op.Op == "dial" {
		// Not connected at all (no permission on the socket, say).
		if timedOut {
			return fmt.Errorf("admin socket %s: the server is not taking connections (its queue is full); %s; nothing was sent: %w", c.socket, check, err)
		}
		return fmt.Errorf("admin socket %s: %w", c.socket, err)
	}
	if timedOut {
		return fmt.Errorf("admin socket %s: %w within %s; %s, or give it longer with --timeout: %w", c.socket, ErrNoAnswer, c.timeout, check, err)
	}
	return fmt.Errorf("admin socket %s: %w: %w", c.socket, ErrNoAnswer, err)
}

// Backup streams a consistent copy of the server's database into w and
// returns its size and when, on the server's clock, the snapshot was taken.
// A stream cut short is an error.
func (c *Client) Backup(ctx context.Context, w io.Writer) (int64, time.Time, error) {
	resp, err := c.send(ctx, http.MethodGet, "/v1/backup", nil)
	if err != nil {
		return 0, time.Time{}, err
	}
	defer resp.Body.Close()
	at, err := time.Parse(time.RFC3339Nano, resp.Header.Get(SnapshotHeader))
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("the server did not say when its snapshot was taken: %w", err)
	}
	dst := &errWriter{w: w}
	n, err := io.Copy(dst, resp.Body)
	if err == nil && resp.ContentLength >= 0 && n != resp.ContentLength {
		err = io.ErrUnexpectedEOF
	}
	switch {
	case dst.err != nil:
		return n, time.Time{}, fmt.Errorf("writing the copy, after %d of %d bytes: %w", n, resp.ContentLength, dst.err)
	case err != nil:
		return n, time.Time{}, fmt.Errorf("stream cut short after %d of %d bytes: %w", n, resp.ContentLength, err)
	}
	return n, at, nil
}

// errWriter remembers its writer's error, to tell a local failure (a full
// disk) from the server's stream breaking.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	n, err := e.w.Write(p)
	if err != nil && e.err == nil {
		e.err = err
	}
	return n, err
}

// CA describes the fleet CA.
func (c *Client) CA(ctx context.Context) (CAInfo, error) {
	var out CAInfo
	return out, c.do(ctx, http.MethodGet, "/v1/ca", nil, &out)
}

// DashboardLogin returns the loopback dashboard's login page and a one-time code.
func (c *Client) DashboardLogin(ctx context.Context) (DashboardLink, error) {
	var out DashboardLink
	return out, c.do(ctx, http.MethodPost, "/v1/dashboard/login", nil, &out)
}

// CreateTokens mints tokens.
func (c *Client) CreateTokens(ctx context.Context, req TokenRequest) ([]NewToken, error) {
	var out []NewToken
	return out, c.do(ctx, http.MethodPost, "/v1/tokens", req, &out)
}

// Tokens lists tokens (never their secrets).
func (c *Client) Tokens(ctx context.Context) ([]TokenInfo, error) {
	var out []TokenInfo
	return out, c.do(ctx, http.MethodGet, "/v1/tokens", nil, &out)
}

// RevokeToken revokes the token with the public id.
func (c *Client) RevokeToken(ctx context.Context, id string) (NewToken, error) {
	var out NewToken
	return out, c.do(ctx, http.MethodPost, "/v1/tokens/"+url.PathEscape(id)+"/revoke", nil, &out)
}

// Devices lists identities with their connection state.
func (c *Client) Devices(ctx context.Context) ([]DeviceInfo, error) {
	var out []DeviceInfo
	return out, c.do(ctx, http.MethodGet, "/v1/devices", nil, &out)
}

// Device shows one identity.
func (c *Client) Device(ctx context.Context, id string) (DeviceInfo, error) {
	var out DeviceInfo
	return out, c.do(ctx, http.MethodGet, "/v1/devices/"+url.PathEscape(id), nil, &out)
}

// RevokeDevice revokes an identity and all its certificates.
func (c *Client) RevokeDevice(ctx context.Context, id string) (RevokeResult, error) {
	var out RevokeResult
	return out, c.do(ctx, http.MethodPost, "/v1/devices/"+url.PathEscape(id)+"/revoke", nil, &out)
}

// RevokeDevices revokes several identities in one request (see
// Handler.RevokeDevices): all of them, or none when one is unknown.
func (c *Client) RevokeDevices(ctx context.Context, ids []string) ([]RevokeOutcome, error) {
	var out []RevokeOutcome
	return out, c.do(ctx, http.MethodPost, "/v1/devices/revoke", RevokeDevicesRequest{IDs: ids}, &out)
}

// IssueIdentity asks for a service or operator certificate for csrPEM.
func (c *Client) IssueIdentity(ctx context.Context, req IdentityRequest) (IdentityResponse, error) {
	var out IdentityResponse
	return out, c.do(ctx, http.MethodPost, "/v1/identities", req, &out)
}

// Audit lists audit events.
func (c *Client) Audit(ctx context.Context, device, since string, limit int) ([]store.AuditEvent, error) {
	q := url.Values{}
	if device != "" {
		q.Set("device", device)
	}
	if since != "" {
		q.Set("since", since)
	}
	if limit > 0 {
		q.Set("limit", fmt.Sprint(limit))
	}
	var out []store.AuditEvent
	return out, c.do(ctx, http.MethodGet, "/v1/audit?"+q.Encode(), nil, &out)
}

// Telemetry calls fn for each message of device, oldest first; with follow
// it keeps streaming until ctx ends.
func (c *Client) Telemetry(ctx context.Context, device, since string, limit int, follow bool, fn func(TelemetryRecord) error) error {
	q := url.Values{}
	if since != "" {
		q.Set("since", since)
	}
	if limit > 0 {
		q.Set("limit", fmt.Sprint(limit))
	}
	if follow {
		q.Set("follow", "1")
	}
	resp, err := c.send(ctx, http.MethodGet, "/v1/telemetry/"+url.PathEscape(device)+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var rec TelemetryRecord
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return fmt.Errorf("decode telemetry: %w", err)
		}
		if err := fn(rec); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		if follow && errors.Is(err, io.ErrUnexpectedEOF) {
			return errors.New("the server closed the stream (it is shutting down or restarting)")
		}
		return fmt.Errorf("read telemetry: %w", err)
	}
	return nil
}
