package server_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/broker/cli"
	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store/storetest"
)

// clock is a settable clock shared by the server under test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// syncBuffer collects the server's log for the secrets checks.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type testServer struct {
	*server.Server
	cfg   server.Config
	clock *clock
	logs  *syncBuffer
}

// startServer runs a real node on loopback ports in a temporary data folder.
func startServer(tb testing.TB, mods ...func(*server.Config)) *testServer {
	tb.Helper()
	clk := newClock()
	logs := &syncBuffer{}
	cfg := server.Config{
		DataDir:    tb.TempDir() + "/data",
		EnrollAddr: "127.0.0.1:0",
		MQTTAddr:   "127.0.0.1:0",
		Logger:     zerolog.New(logs).Level(zerolog.DebugLevel),
		Now:        clk.Now,
	}
	for _, m := range mods {
		m(&cfg)
	}
	srv, err := server.New(cfg)
	if err != nil {
		tb.Fatalf("new server: %v", err)
	}
	if err := srv.Start(); err != nil {
		tb.Fatalf("start server: %v", err)
	}
	tb.Cleanup(func() {
		if err := srv.Close(); err != nil {
			tb.Errorf("close server: %v", err)
		}
	})
	return &testServer{Server: srv, cfg: cfg, clock: clk, logs: logs}
}

func (s *testServer) url(path string) string {
	return "https://" + s.EnrollAddr().String() + path
}

// cli runs an operator command in-process against the server.
func (s *testServer) cli(tb testing.TB, args ...string) (stdout, stderr string, code int) {
	tb.Helper()
	return s.cliIn(tb, "", args...)
}

// cliIn is cli with stdin.
func (s *testServer) cliIn(tb testing.TB, stdin string, args ...string) (stdout, stderr string, code int) {
	tb.Helper()
	var out, errb bytes.Buffer
	code = cli.Main(context.Background(), args, cli.Env{
		Stdin: strings.NewReader(stdin), Stdout: &out, Stderr: &errb,
		Getenv: func(k string) string {
			if k == "FLEETMQ_DATA" {
				return s.cfg.DataDir
			}
			return ""
		},
	})
	return out.String(), errb.String(), code
}

// token mints one token through the CLI and returns its secret.
func (s *testServer) token(tb testing.TB, args ...string) string {
	tb.Helper()
	out, errs, code := s.cli(tb, append([]string{"token", "create"}, args...)...)
	if code != 0 {
		tb.Fatalf("token create: exit %d: %s", code, errs)
	}
	return strings.TrimSpace(out)
}

// client is an HTTPS client that trusts the fleet CA and presents cert, if any.
func (s *testServer) client(cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: s.CA().Pool()}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 30 * time.Second}
}

type answer struct {
	status int
	code   string
	body   []byte
	resp   enroll.Response
	header http.Header
}

func (s *testServer) post(tb testing.TB, c *http.Client, path string, hdr map[string]string, body []byte) answer {
	tb.Helper()
	req, err := http.NewRequest(http.MethodPost, s.url(path), bytes.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		tb.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	a := answer{status: resp.StatusCode, body: b, header: resp.Header}
	if resp.StatusCode >= 400 {
		var e struct{ Code string }
		if err := json.Unmarshal(b, &e); err != nil {
			tb.Fatalf("POST %s: %d with a non-JSON error body %q", path, resp.StatusCode, b)
		}
		a.code = e.Code
	} else if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(b, &a.resp); err != nil {
			tb.Fatalf("decode answer: %v", err)
		}
	}
	return a
}

// device is a key with its certificate once enrolled.
type device struct {
	key  crypto.Signer
	cert *x509.Certificate
	resp enroll.Response
}

func (d *device) tlsCert() *tls.Certificate {
	return &tls.Certificate{Certificate: [][]byte{d.cert.Raw}, PrivateKey: d.key, Leaf: d.cert}
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func csrPEM(tb testing.TB, key crypto.Signer, cn string) []byte {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		tb.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func bearer(tok string) map[string]string {
	return map[string]string{"Authorization": "Bearer " + tok, "Content-Type": "application/pkcs10"}
}

// enroll enrolls id with tok and fails the test unless it works.
func (s *testServer) enroll(tb testing.TB, tok, id string) *device {
	tb.Helper()
	key := newKey(tb)
	a := s.post(tb, s.client(nil), "/v1/enroll", bearer(tok), csrPEM(tb, key, id))
	if a.status != http.StatusCreated {
		tb.Fatalf("enroll %s: %d %s", id, a.status, a.body)
	}
	return &device{key: key, cert: parseCert(tb, a.resp.Certificate), resp: a.resp}
}

func parseCert(tb testing.TB, p string) *x509.Certificate {
	tb.Helper()
	block, _ := pem.Decode([]byte(p))
	if block == nil {
		tb.Fatalf("no PEM certificate in %q", p)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// snapshot is the fleet state that a refused request must leave unchanged.
func (s *testServer) snapshot(tb testing.TB) string {
	tb.Helper()
	return storetest.FleetState(tb, s.Store())
}
