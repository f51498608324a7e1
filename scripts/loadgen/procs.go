package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// broker is one broker process under test.
type broker struct {
	name    string
	addr    string // MQTT over TLS
	args    []string
	logPath string
	ready   func(ctx context.Context) error

	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	waitErr error
}

func (b *broker) start(ctx context.Context) error {
	logf, err := os.OpenFile(b.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(b.args[0], b.args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", b.name, err)
	}
	b.cmd, b.done = cmd, make(chan struct{})
	go func() {
		b.waitErr = cmd.Wait()
		close(b.done)
	}()
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	rerr := make(chan error, 1)
	go func() { rerr <- b.ready(rctx) }()
	select {
	case err := <-rerr:
		if err != nil {
			b.stop()
			return fmt.Errorf("%s not ready (log %s): %w", b.name, b.logPath, err)
		}
		return nil
	case <-b.done:
		b.cmd = nil
		return fmt.Errorf("%s exited at start (log %s): %v", b.name, b.logPath, b.waitErr)
	}
}

// stop ends the process with SIGTERM, then SIGKILL after 10 s.
func (b *broker) stop() {
	if b.cmd == nil {
		return
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.done
	}
	b.cmd = nil
}

func (b *broker) pid() int { return b.cmd.Process.Pid }

// freePort returns a loopback address with a port that was free a moment
// ago; the broker binds it right after.
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// waitHTTP polls url until it answers 200.
func waitHTTP(ctx context.Context, url string) error {
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitTCP polls addr until it accepts a connection.
func waitTCP(ctx context.Context, addr string) error {
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

type fleetmqProc struct {
	broker
	bin         string
	data        string
	enrollAddr  string
	metricsAddr string
}

func newFleetmq(bin, dir string, pki *pki, pprofAddr string, extra []string) (*fleetmqProc, error) {
	var addrs [3]string
	for i := range addrs {
		a, err := freePort()
		if err != nil {
			return nil, err
		}
		addrs[i] = a
	}
	f := &fleetmqProc{bin: bin, data: filepath.Join(dir, "fleetmq-data"), enrollAddr: addrs[1], metricsAddr: addrs[2]}
	f.name, f.addr, f.logPath = "fleetmq", addrs[0], filepath.Join(dir, "fleetmq.log")
	f.args = []string{bin, "serve",
		"--data", f.data,
		"--ca-cert", pki.certPath, "--ca-key", pki.keyPath,
		"--mqtt-addr", f.addr, "--enroll-addr", f.enrollAddr,
		"--metrics-addr", f.metricsAddr, "--ui-addr", "off",
		// The throughput scenarios measure the broker, not its per-device
		// publish limit (100/s by default).
		"--publish-rate", "1e9", "--publish-burst", "1000000000",
		"--max-connections", "20000",
		"--log-level", "warn", "--log-format", "json",
	}
	if pprofAddr != "" {
		f.args = append(f.args, "--pprof-addr", pprofAddr)
	}
	f.args = append(f.args, extra...)
	f.ready = func(ctx context.Context) error {
		return waitHTTP(ctx, "http://"+f.metricsAddr+"/readyz")
	}
	return f, nil
}

// cli runs a fleetmq operator command against the running server.
func (f *fleetmqProc) cli(ctx context.Context, args ...string) ([]byte, error) {
	args = append(args, "--data", f.data)
	cmd := exec.CommandContext(ctx, f.bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("fleetmq %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// metric returns the sum of a counter's series from /metrics.
func (f *fleetmqProc) metric(name string) (float64, error) {
	resp, err := http.Get("http://" + f.metricsAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum, sc.Err()
}

func newMosquitto(bin, dir string, pki *pki, subscriber string) (*broker, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	_, port, _ := net.SplitHostPort(addr)
	certPath, keyPath := filepath.Join(dir, "mosquitto-server.pem"), filepath.Join(dir, "mosquitto-server.key")
	if err := pki.serverCert(certPath, keyPath); err != nil {
		return nil, err
	}
	aclPath := filepath.Join(dir, "mosquitto.acl")
	acl := fmt.Sprintf("user %s\ntopic read devices/+/telemetry\n\npattern readwrite devices/%%u/#\n", subscriber)
	if err := os.WriteFile(aclPath, []byte(acl), 0o644); err != nil {
		return nil, err
	}
	conf := []string{
		"per_listener_settings false",
		"listener " + port + " 127.0.0.1",
		"cafile " + pki.certPath,
		"certfile " + certPath,
		"keyfile " + keyPath,
		"require_certificate true",
		"use_identity_as_username true",
		"tls_version tlsv1.2",
		"acl_file " + aclPath,
		"set_tcp_nodelay true",
		"persistence false",
		"max_connections -1",
		// fleetmq logs no line per connection at its default level either.
		"log_dest stderr",
		"log_type error",
		"log_type warning",
	}
	if u, err := user.Current(); err == nil && u.Uid == "0" {
		// mosquitto started as root switches to the mosquitto user, which
		// cannot read this run's 0600 key files.
		conf = append(conf, "user root")
	}
	confPath := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(confPath, []byte(strings.Join(conf, "\n")+"\n"), 0o644); err != nil {
		return nil, err
	}
	b := &broker{name: "mosquitto", addr: addr, args: []string{bin, "-c", confPath},
		logPath: filepath.Join(dir, "mosquitto.log")}
	b.ready = func(ctx context.Context) error { return waitTCP(ctx, addr) }
	return b, nil
}

// procRSS returns the resident set of pid in bytes (VmRSS).
func procRSS(pid int) (uint64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS line")
}

// procCPU returns the CPU time pid has used, user and system.
func procCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may contain spaces.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("bad /proc stat")
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	// USER_HZ is 100 on every Linux this runs on.
	return time.Duration(ut+st) * 10 * time.Millisecond, nil
}
