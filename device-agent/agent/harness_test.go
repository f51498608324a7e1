package agent

// A fake enrollment server and a real MQTT broker (mochi) for testing the
// agent without the fleetmq server. They implement the agent's side of the
// contract only as far as the tests need. mochi is imported by tests only:
// the agent binary never links it (see ../deps_test.go).

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

type fakeServer struct {
	tb  testing.TB
	ca  *testCA
	srv *httptest.Server

	mu         sync.Mutex
	secret     string // token secret part
	boundID    string // id used when the CSR has no CN
	lifetime   time.Duration
	brokerURL  string
	revoked    map[string]bool // device ids
	expiredAns bool            // answer cert_expired on renewal after expiry
	forgotten  bool            // answer cert_invalid to every renewal, as a server restored from an older backup
	superseded bool            // answer cert_revoked to renewals, as for a device re-provisioned since
	dateOffset time.Duration   // added to the Date header
	backdate   time.Duration   // how far NotBefore lies before now; default a minute
	renewMTLS  int
	renewProof int
	dropEnroll int      // enroll answers to cut off, as a link losing them
	enrollReqs int      // POST /v1/enroll requests
	renewDown  bool     // answer every renewal 503, as a server that is down
	renewReqs  int      // POST /v1/renew requests
	enrollKeys [][]byte // the public key (PKIX DER) of each enroll CSR
}

func newFakeServer(tb testing.TB, ca *testCA) *fakeServer {
	tb.Helper()
	f := &fakeServer{tb: tb, ca: ca, boundID: "bound-1", lifetime: time.Hour, revoked: map[string]bool{}, brokerURL: "mqtts://127.0.0.1:1"}
	tok := validToken(tb, sha256.Sum256(ca.cert.Raw))
	f.secret = strings.Split(tok, ".")[1]
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/ca", func(w http.ResponseWriter, r *http.Request) {
		f.date(w)
		w.Header().Set("Content-Type", "application/x-pem-file")
		_, _ = w.Write(ca.pem)
	})
	mux.HandleFunc("POST /v1/enroll", f.enroll)
	mux.HandleFunc("POST /v1/renew", f.renew)
	f.srv = httptest.NewUnstartedServer(mux)
	f.srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{ca.serverTLS(tb)},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    certPool([]*x509.Certificate{ca.cert}),
	}
	f.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	f.srv.StartTLS()
	tb.Cleanup(f.srv.Close)
	return f
}

// token returns a token for this server pinned to fp.
func (f *fakeServer) token(fp [32]byte) string {
	return "fmq1." + f.secret + "." + hex.EncodeToString(fp[:])
}

func (f *fakeServer) goodToken() string { return f.token(sha256.Sum256(f.ca.cert.Raw)) }

func (f *fakeServer) date(w http.ResponseWriter) {
	f.mu.Lock()
	off := f.dateOffset
	f.mu.Unlock()
	w.Header().Set("Date", time.Now().Add(off).UTC().Format(http.TimeFormat))
}

func (f *fakeServer) fail(w http.ResponseWriter, status int, code string) {
	f.date(w)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"code": code, "message": code + " (fake)"})
}

func (f *fakeServer) issue(w http.ResponseWriter, status int, csr *x509.CertificateRequest, id string) {
	f.mu.Lock()
	life, broker, back := f.lifetime, f.brokerURL, f.backdate
	f.mu.Unlock()
	if back == 0 {
		back = time.Minute
	}
	now := time.Now()
	c := f.ca.issue(f.tb, csr.PublicKey, id, now.Add(-back), now.Add(life), false)
	f.date(w)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"device_id":   id,
		"certificate": string(certPEMOf(c)),
		"ca":          string(f.ca.pem),
		"not_after":   c.NotAfter,
		"broker_url":  broker,
	})
}

func parseCSRPEM(b []byte) (*x509.CertificateRequest, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("no csr")
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return nil, err
	}
	return csr, csr.CheckSignature()
}

func (f *fakeServer) enroll(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.enrollReqs++
	f.mu.Unlock()
	if r.Header.Get("Authorization") == "" {
		f.fail(w, 401, "token_missing")
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "), ".")
	if len(parts) != 3 || parts[1] != f.secret {
		f.fail(w, 401, "token_unknown")
		return
	}
	if r.Header.Get("Content-Type") != "application/pkcs10" {
		f.fail(w, 415, "unsupported_media_type")
		return
	}
	body, _ := io.ReadAll(r.Body)
	csr, err := parseCSRPEM(body)
	if err != nil {
		f.fail(w, 400, "csr_invalid")
		return
	}
	id := csr.Subject.CommonName
	if id == "" {
		id = f.boundID
	}
	pub, _ := x509.MarshalPKIXPublicKey(csr.PublicKey)
	f.mu.Lock()
	f.enrollKeys = append(f.enrollKeys, pub)
	drop := f.dropEnroll > 0
	if drop {
		f.dropEnroll--
	}
	f.mu.Unlock()
	if drop {
		if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
			c.Close()
		}
		return
	}
	f.issue(w, http.StatusCreated, csr, id)
}

func (f *fakeServer) renew(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	forgotten, down := f.forgotten, f.renewDown
	f.renewReqs++
	f.mu.Unlock()
	if down {
		f.fail(w, 503, "unavailable")
		return
	}
	if forgotten {
		f.fail(w, 401, "cert_invalid")
		return
	}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		f.mu.Lock()
		f.renewMTLS++
		revoked := f.revoked[r.TLS.PeerCertificates[0].Subject.CommonName]
		superseded := f.superseded
		f.mu.Unlock()
		id := r.TLS.PeerCertificates[0].Subject.CommonName
		if revoked {
			f.fail(w, 403, "device_revoked")
			return
		}
		if superseded {
			f.fail(w, 403, "cert_revoked")
			return
		}
		if r.Header.Get("Content-Type") != "application/pkcs10" {
			f.fail(w, 415, "unsupported_media_type")
			return
		}
		csr, err := parseCSRPEM(body)
		if err != nil || csr.Subject.CommonName != id {
			f.fail(w, 400, "csr_invalid")
			return
		}
		f.issue(w, 200, csr, id)
		return
	}
	f.mu.Lock()
	f.renewProof++
	expiredAns := f.expiredAns
	f.mu.Unlock()
	var req struct{ CSR, Certificate, Signature string }
	if r.Header.Get("Content-Type") != "application/json" || json.Unmarshal(body, &req) != nil {
		f.fail(w, 401, "cert_required")
		return
	}
	certs, err := parseCerts([]byte(req.Certificate))
	if err != nil || len(certs) != 1 {
		f.fail(w, 401, "cert_invalid")
		return
	}
	old := certs[0]
	if _, err := old.Verify(x509.VerifyOptions{Roots: certPool([]*x509.Certificate{f.ca.cert}), CurrentTime: old.NotBefore.Add(time.Second),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		f.fail(w, 401, "cert_invalid")
		return
	}
	if expiredAns {
		f.fail(w, 401, "cert_expired")
		return
	}
	f.mu.Lock()
	revoked := f.revoked[old.Subject.CommonName]
	superseded := f.superseded
	f.mu.Unlock()
	if revoked {
		f.fail(w, 403, "device_revoked")
		return
	}
	if superseded {
		f.fail(w, 403, "cert_revoked")
		return
	}
	csr, err := parseCSRPEM([]byte(req.CSR))
	if err != nil || csr.Subject.CommonName != old.Subject.CommonName {
		f.fail(w, 400, "csr_invalid")
		return
	}
	sig, err := base64.StdEncoding.DecodeString(req.Signature)
	sum := sha256.Sum256(csr.Raw)
	pub, ok := old.PublicKey.(*ecdsa.PublicKey)
	if err != nil || !ok || !ecdsa.VerifyASN1(pub, sum[:], sig) {
		f.fail(w, 401, "proof_invalid")
		return
	}
	f.issue(w, 200, csr, old.Subject.CommonName)
}

func (f *fakeServer) set(fn func(f *fakeServer)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeServer) counts() (mtls, proof int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.renewMTLS, f.renewProof
}

// gateListener drops connections while closed, so the broker can be made
// unreachable and back without changing its port.
type gateListener struct {
	net.Listener
	mu     sync.Mutex
	closed bool
	conns  []net.Conn
	// live counts the connections handed to mochi until mochi closes
	// them: mochi's Close races with a connection it is still setting up
	// (its NewClient), so the broker is closed once none is left.
	live sync.WaitGroup
}

// trackedConn tells its listener when mochi closes it.
type trackedConn struct {
	net.Conn
	once sync.Once
	done func()
}

func (c *trackedConn) Close() error {
	c.once.Do(c.done)
	return c.Conn.Close()
}

func (g *gateListener) Accept() (net.Conn, error) {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			return nil, err
		}
		g.mu.Lock()
		if g.closed {
			g.mu.Unlock()
			_ = c.Close()
			continue
		}
		g.conns = append(g.conns, c)
		g.live.Add(1)
		g.mu.Unlock()
		return &trackedConn{Conn: c, done: g.live.Done}, nil
	}
}

// setOpen opens or closes the gate; closing cuts every live connection.
func (g *gateListener) setOpen(open bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = !open
	if !open {
		for _, c := range g.conns {
			_ = c.Close()
		}
		g.conns = nil
	}
}

type brokerMsg struct {
	topic   string
	payload string
	retain  bool
}

type testBroker struct {
	srv  *mqtt.Server
	gate *gateListener
	url  string
	msgs chan brokerMsg

	mu      sync.Mutex
	revoked map[string]bool // serials, hex
	serials chan string     // serial of every accepted connection
}

// connHook lets every client in (the TLS layer already checked the
// certificate) and records the certificate serial of each connection.
type connHook struct {
	mqtt.HookBase
	b *testBroker
}

func (h *connHook) ID() string { return "conn" }
func (h *connHook) Provides(b byte) bool {
	return b == mqtt.OnConnect || b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (h *connHook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (h *connHook) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }
func (h *connHook) OnConnect(cl *mqtt.Client, _ packets.Packet) error {
	if tc, ok := cl.Net.Conn.(*tls.Conn); ok {
		if pcs := tc.ConnectionState().PeerCertificates; len(pcs) > 0 {
			select {
			case h.b.serials <- pcs[0].SerialNumber.Text(16):
			default:
			}
		}
	}
	return nil
}

func newTestBroker(tb testing.TB, ca *testCA) *testBroker {
	tb.Helper()
	b := &testBroker{msgs: make(chan brokerMsg, 10000), revoked: map[string]bool{}, serials: make(chan string, 100)}
	srv := mqtt.New(&mqtt.Options{
		InlineClient: true,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err := srv.AddHook(&connHook{b: b}, nil); err != nil {
		tb.Fatal(err)
	}
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	b.gate = &gateListener{Listener: raw}
	ln := tls.NewListener(b.gate, &tls.Config{
		Certificates: []tls.Certificate{ca.serverTLS(tb)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    certPool([]*x509.Certificate{ca.cert}),
		VerifyConnection: func(cs tls.ConnectionState) error {
			b.mu.Lock()
			defer b.mu.Unlock()
			if len(cs.PeerCertificates) > 0 && b.revoked[cs.PeerCertificates[0].SerialNumber.Text(16)] {
				return fmt.Errorf("certificate revoked")
			}
			return nil
		},
	})
	if err := srv.AddListener(listeners.NewNet("t", ln)); err != nil {
		tb.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		// As the fleetmq broker does: no new socket, the open ones cut,
		// and every one released by mochi before its Close.
		_ = b.gate.Listener.Close()
		b.gate.setOpen(false)
		b.gate.live.Wait()
		_ = srv.Close()
	})
	err = srv.Subscribe("devices/#", 1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		b.msgs <- brokerMsg{topic: pk.TopicName, payload: string(pk.Payload), retain: pk.FixedHeader.Retain}
	})
	if err != nil {
		tb.Fatal(err)
	}
	b.srv = srv
	b.url = "mqtts://" + raw.Addr().String()
	return b
}

func (b *testBroker) revoke(serial string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.revoked[serial] = true
}

// next waits for the next message on topic, skipping others into skipped.
func (b *testBroker) next(tb testing.TB, topic string, timeout time.Duration) brokerMsg {
	tb.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		select {
		case m := <-b.msgs:
			if m.topic == topic {
				return m
			}
		case <-deadline.C:
			tb.Fatalf("no message on %s within %v", topic, timeout)
		}
	}
}

// eventually waits until cond holds, checking every few milliseconds.
func eventually(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

// hangingBroker is a broker that stops answering: it accepts TCP and then
// says nothing (not even the TLS handshake), or, with connack, completes
// the handshake and CONNACKs, then reads and never acknowledges anything.
type hangingBroker struct {
	url     string
	packets chan byte // type of every packet read after CONNACK; a value on accept without connack

	mu    sync.Mutex
	conns []net.Conn
}

func newHangingBroker(tb testing.TB, ca *testCA, connack bool) *hangingBroker {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	h := &hangingBroker{url: "mqtts://" + ln.Addr().String(), packets: make(chan byte, 100)}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{ca.serverTLS(tb)}, ClientAuth: tls.RequestClientCert}
	var wg sync.WaitGroup
	tb.Cleanup(func() {
		_ = ln.Close()
		h.mu.Lock()
		for _, c := range h.conns {
			_ = c.Close()
		}
		h.mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			h.mu.Lock()
			h.conns = append(h.conns, c)
			h.mu.Unlock()
			if !connack {
				select {
				case h.packets <- 0:
				default:
				}
				continue // holds the connection, says nothing
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				h.serve(tls.Server(c, tlsConf))
			}()
		}
	}()
	return h
}

// serve answers CONNECT, then reports and ignores every packet.
func (h *hangingBroker) serve(c net.Conn) {
	r := bufio.NewReader(c)
	for first := true; ; first = false {
		typ, err := r.ReadByte()
		if err != nil {
			return
		}
		var n, shift int
		for {
			b, err := r.ReadByte()
			if err != nil {
				return
			}
			n |= int(b&0x7f) << shift
			shift += 7
			if b&0x80 == 0 {
				break
			}
		}
		if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
			return
		}
		if first {
			if _, err := c.Write([]byte{0x20, 0x02, 0x00, 0x00}); err != nil { // CONNACK, accepted
				return
			}
			continue
		}
		select {
		case h.packets <- typ >> 4:
		default:
		}
	}
}
