// Command loadgen runs fleetmq and mosquitto side by side on loopback with
// the same PKI, the same device certificates and the same load, and prints
// a table of the two with ratios. scripts/bench.sh builds and runs it and
// refreshes BENCHMARKS.md with its output.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"
)

type config struct {
	fleetmq, mosquitto string
	devices            int // enrolled; all of them connect in the memory scenario
	connects           int
	dialers            int
	pubDevices         int
	msgs               int
	inflight           int
	rate               float64
	latencyDur         time.Duration
	rounds             int
	work               string
	keep               bool
	update             string
	command            string
	scenarios          map[string]bool
	pprofDir           string
	fleetmqArgs        []string
}

var allScenarios = []string{"connect", "connect-x25519", "resume", "qos0", "qos1", "latency", "memory"}

func main() {
	var cfg config
	var scen, extra string
	flag.StringVar(&cfg.fleetmq, "fleetmq", "", "fleetmq binary (required)")
	flag.StringVar(&cfg.mosquitto, "mosquitto", "/usr/sbin/mosquitto", "mosquitto binary")
	flag.IntVar(&cfg.devices, "devices", 5000, "devices to enroll; all connect at once in the memory scenario")
	flag.IntVar(&cfg.connects, "connects", 2000, "devices that connect in the connect scenarios, once each per round")
	flag.IntVar(&cfg.dialers, "dialers", 16, "concurrent dialers")
	flag.IntVar(&cfg.pubDevices, "pub-devices", 50, "publishing devices")
	flag.IntVar(&cfg.msgs, "msgs", 2000, "messages per publishing device")
	flag.IntVar(&cfg.inflight, "inflight", 16, "unacknowledged QoS 1 messages per device")
	flag.Float64Var(&cfg.rate, "rate", 1000, "total publish rate of the latency scenario, messages/s")
	flag.DurationVar(&cfg.latencyDur, "latency-duration", 5*time.Second, "length of the latency scenario")
	flag.IntVar(&cfg.rounds, "rounds", 3, "rounds; each runs every scenario on both brokers, alternating which goes first")
	flag.StringVar(&cfg.work, "work", "", "work folder (default: a new temporary folder, removed at the end)")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the work folder (logs, PKI, data)")
	flag.StringVar(&cfg.update, "update", "", "markdown file whose bench section (between the bench.sh markers) is replaced with the results")
	flag.StringVar(&cfg.command, "command", "", "command line recorded in the results")
	flag.StringVar(&scen, "scenarios", strings.Join(allScenarios, ","), "scenarios to run")
	flag.StringVar(&cfg.pprofDir, "pprof-dir", "", "capture fleetmq CPU profiles of each scenario and a heap profile of the idle connections here")
	flag.StringVar(&extra, "fleetmq-args", "", "extra flags for fleetmq serve, space separated")
	cpuProfile := flag.String("cpuprofile", "", "write the load generator's own CPU profile here")
	flag.Parse()
	if cfg.fleetmq == "" {
		fmt.Fprintln(os.Stderr, "loadgen: -fleetmq is required")
		os.Exit(2)
	}
	cfg.scenarios = map[string]bool{}
	for s := range strings.SplitSeq(scen, ",") {
		if !slices.Contains(allScenarios, s) {
			fmt.Fprintf(os.Stderr, "loadgen: unknown scenario %q (have %s)\n", s, strings.Join(allScenarios, ","))
			os.Exit(2)
		}
		cfg.scenarios[s] = true
	}
	cfg.fleetmqArgs = strings.Fields(extra)
	cfg.devices = max(cfg.devices, cfg.connects, cfg.pubDevices)

	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

// side is what one broker measured, one entry per round.
type side struct {
	connect, resume  []connectResult
	connectX         []connectResult // the client offering X25519 only
	connectCPU       []time.Duration // broker CPU per connect
	clientCPU        []time.Duration // load generator CPU per connect
	connectXCPU      []time.Duration
	clientXCPU       []time.Duration
	resumeCPU        []time.Duration
	qos0, qos1       []float64
	qos0CPU, qos1CPU []time.Duration // broker CPU per message
	latency          []latencyResult
	idle             *idleResult
}

type results struct {
	cfg          config
	start        time.Time
	fleet, mosq  side
	enrollRate   float64
	qos0Dropped  float64 // fleetmq QoS 0 telemetry dropped, queue full
	qos0Sent     float64
	machine      machine
	fleetVersion string
	mosqVersion  string
}

func run(ctx context.Context, cfg config) (err error) {
	res := &results{cfg: cfg, start: time.Now(), machine: describeMachine()}
	dir := cfg.work
	if dir == "" {
		// Short: the admin socket's path must fit in 108 bytes.
		if dir, err = os.MkdirTemp("", "fmqb-"); err != nil {
			return err
		}
		if !cfg.keep {
			defer os.RemoveAll(dir)
		}
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if cfg.pprofDir != "" {
		if err := os.MkdirAll(cfg.pprofDir, 0o755); err != nil {
			return err
		}
	}
	logf("work folder %s", dir)

	p, err := newPKI(dir)
	if err != nil {
		return err
	}
	pprofAddr := ""
	if cfg.pprofDir != "" {
		if pprofAddr, err = freePort(); err != nil {
			return err
		}
	}
	fm, err := newFleetmq(cfg.fleetmq, dir, p, pprofAddr, cfg.fleetmqArgs)
	if err != nil {
		return err
	}
	if err := fm.start(ctx); err != nil {
		return err
	}
	defer fm.stop()
	if out, err := fm.cli(ctx, "version"); err == nil {
		res.fleetVersion = strings.TrimSpace(string(out))
	}

	// Identities: one token and one enrollment per device, through the
	// operator CLI and the enrollment API; a service certificate for the
	// subscriber.
	logf("minting %d tokens", cfg.devices)
	ids, toks, err := mintTokens(ctx, fm, dir, cfg.devices)
	if err != nil {
		return err
	}
	devs, err := newDevices(ids)
	if err != nil {
		return err
	}
	logf("enrolling %d devices", len(devs))
	if res.enrollRate, err = enrollAll(ctx, fm.enrollAddr, p, devs, toks, cfg.dialers); err != nil {
		return err
	}
	logf("  %.0f enrollments/s", res.enrollRate)
	const subID = "bench-sub"
	subDir := filepath.Join(dir, "sub")
	if err := os.MkdirAll(subDir, 0o700); err != nil {
		return err
	}
	if _, err := fm.cli(ctx, "service", "issue", subID, "--out", subDir); err != nil {
		return err
	}
	sub, err := loadKeyPair(filepath.Join(subDir, subID+".pem"), filepath.Join(subDir, subID+".key"))
	if err != nil {
		return err
	}

	mq, err := newMosquitto(cfg.mosquitto, dir, p, subID)
	if err != nil {
		return err
	}
	if err := mq.start(ctx); err != nil {
		return err
	}
	defer mq.stop()
	res.mosqVersion = mosquittoVersion(cfg.mosquitto)

	type target struct {
		name string
		b    *broker
		s    *side
	}
	fleet := target{"fleetmq", &fm.broker, &res.fleet}
	mosq := target{"mosquitto", mq, &res.mosq}
	connectDevs := devs[:cfg.connects]
	pubDevs := devs[:cfg.pubDevices]
	for round := range cfg.rounds {
		order := []target{fleet, mosq}
		if round%2 == 1 {
			order = []target{mosq, fleet}
		}
		for _, sc := range []string{"connect", "connect-x25519", "resume", "qos0", "qos1", "latency"} {
			if !cfg.scenarios[sc] {
				continue
			}
			for _, t := range order {
				if err := ctx.Err(); err != nil {
					return err
				}
				logf("round %d: %s on %s", round+1, sc, t.name)
				var prof func()
				if t.b == &fm.broker && cfg.pprofDir != "" {
					prof = startCPUProfile(pprofAddr, filepath.Join(cfg.pprofDir, fmt.Sprintf("%s-%d.cpu.pprof", sc, round+1)))
				}
				cpu0, _ := procCPU(t.b.pid())
				self0, _ := procCPU(os.Getpid())
				var ops int
				switch sc {
				case "connect", "connect-x25519":
					var curves []tls.CurveID // Go's default: X25519MLKEM768 first
					if sc == "connect-x25519" {
						curves = []tls.CurveID{tls.X25519}
					}
					r, err := runConnects(t.b.addr, connectDevs, p.pool, cfg.dialers, nil, curves)
					if err != nil {
						return fmt.Errorf("%s: %w", t.name, err)
					}
					if sc == "connect" {
						t.s.connect = append(t.s.connect, r)
					} else {
						t.s.connectX = append(t.s.connectX, r)
					}
					ops = r.n
					logf("  %.0f connects/s, p50 %s, p99 %s", r.rate, r.p50, r.p99)
				case "resume":
					caches := make([]tls.ClientSessionCache, len(connectDevs))
					for i := range caches {
						caches[i] = tls.NewLRUClientSessionCache(1)
					}
					// The first pass gets each device a session ticket.
					if _, err := runConnects(t.b.addr, connectDevs, p.pool, cfg.dialers, caches, nil); err != nil {
						return fmt.Errorf("%s: %w", t.name, err)
					}
					cpu0, _ = procCPU(t.b.pid())
					r, err := runConnects(t.b.addr, connectDevs, p.pool, cfg.dialers, caches, nil)
					if err != nil {
						return fmt.Errorf("%s: %w", t.name, err)
					}
					t.s.resume = append(t.s.resume, r)
					ops = r.n
					logf("  %.0f reconnects/s, %d of %d resumed, p50 %s, p99 %s", r.rate, r.resumed, r.n, r.p50, r.p99)
				case "qos0", "qos1":
					qos := byte(0)
					if sc == "qos1" {
						qos = 1
					}
					var drop0 float64
					if t.b == &fm.broker && qos == 0 {
						drop0, _ = fm.metric("fleetmq_telemetry_rejected_total")
					}
					r, err := runThroughput(t.b.addr, pubDevs, p.pool, qos, cfg.msgs, cfg.inflight)
					if err != nil {
						return fmt.Errorf("%s: %w", t.name, err)
					}
					ops = len(pubDevs) * cfg.msgs
					if qos == 0 {
						t.s.qos0 = append(t.s.qos0, r)
						if t.b == &fm.broker {
							drop1, _ := fm.metric("fleetmq_telemetry_rejected_total")
							res.qos0Dropped += drop1 - drop0
							res.qos0Sent += float64(ops)
						}
					} else {
						t.s.qos1 = append(t.s.qos1, r)
					}
					logf("  %.0f msgs/s", r)
				case "latency":
					r, err := runLatency(t.b.addr, pubDevs, p.pool, sub, subID, cfg.rate, cfg.latencyDur)
					if err != nil {
						return fmt.Errorf("%s: %w", t.name, err)
					}
					t.s.latency = append(t.s.latency, r)
					logf("  p50 %s, p99 %s, %d of %d received", r.p50, r.p99, r.recv, r.sent)
				}
				cpu1, _ := procCPU(t.b.pid())
				self1, _ := procCPU(os.Getpid())
				if sc == "connect" && ops > 0 {
					t.s.clientCPU = append(t.s.clientCPU, (self1-self0)/time.Duration(ops))
				}
				if sc == "connect-x25519" && ops > 0 {
					t.s.clientXCPU = append(t.s.clientXCPU, (self1-self0)/time.Duration(ops))
				}
				if ops > 0 {
					per := (cpu1 - cpu0) / time.Duration(ops)
					switch sc {
					case "connect":
						t.s.connectCPU = append(t.s.connectCPU, per)
					case "connect-x25519":
						t.s.connectXCPU = append(t.s.connectXCPU, per)
					case "resume":
						t.s.resumeCPU = append(t.s.resumeCPU, per)
					case "qos0":
						t.s.qos0CPU = append(t.s.qos0CPU, per)
					case "qos1":
						t.s.qos1CPU = append(t.s.qos1CPU, per)
					}
				}
				if prof != nil {
					prof()
				}
			}
		}
	}

	if cfg.scenarios["memory"] {
		// Each broker is restarted so that the earlier scenarios' memory
		// does not hide (or inflate) what the connections cost.
		for _, t := range []target{fleet, mosq} {
			t.b.stop()
			if err := t.b.start(ctx); err != nil {
				return err
			}
			logf("memory: %d idle connections on %s", len(devs), t.name)
			r, err := runIdle(t.b.pid(), t.b.addr, devs, p.pool, cfg.dialers, func() {
				if t.b == &fm.broker && cfg.pprofDir != "" {
					fetch(pprofAddr, "/debug/pprof/heap", filepath.Join(cfg.pprofDir, "idle.heap.pprof"))
					fetch(pprofAddr, "/debug/pprof/goroutine", filepath.Join(cfg.pprofDir, "idle.goroutine.pprof"))
				}
			})
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			t.s.idle = &r
			logf("  %.1f KiB per connection (RSS %.1f → %.1f MiB)", r.perConn()/1024, float64(r.base)/(1<<20), float64(r.after)/(1<<20))
		}
	}

	report := res.markdown()
	fmt.Println(report)
	if cfg.update != "" {
		if err := updateFile(cfg.update, report); err != nil {
			return err
		}
		logf("updated %s", cfg.update)
	}
	return nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// startCPUProfile profiles fleetmq in one-second slices until the returned
// function is called: pprof's endpoint returns nothing when a profile is
// cut short. `go tool pprof PATH.*` merges the slices.
func startCPUProfile(addr, path string) func() {
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := fetch(addr, "/debug/pprof/profile?seconds=1", fmt.Sprintf("%s.%d", path, i)); err != nil {
				logf("  profile: %v", err)
				return
			}
		}
	}()
	return func() {
		close(stop)
		<-stopped
	}
}

func fetch(addr, path, out string) error {
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return errors.New(resp.Status)
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
