package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Stdio is the process environment the command line uses.
type Stdio struct {
	In       io.Reader
	Out, Err io.Writer
	Getenv   func(string) string
}

const usage = `usage: device-agent <command> [flags]

commands:
  enroll --server URL --token TOKEN [--id ID] [--force]
                  enroll this device (TOKEN "-" reads it from stdin)
  run [--interval 30s]
                  publish telemetry and keep the certificate fresh
  status [--json] show the enrollment and connection state (exit 1 if the
                  identity or state.json is broken, 3 if not enrolled)
  renew           renew the certificate now
  version         print the version

common flags:
  --state-dir DIR  state folder (default $STATE_DIRECTORY or /var/lib/device-agent)
  --log-level L    debug, info, warn or error (default info)
`

// commandUsage is the synopsis and purpose of each command, for its -h.
var commandUsage = map[string]string{
	"enroll": "enroll --server URL --token TOKEN [--id ID] [--force] [--state-dir DIR]\n\n" +
		"Enroll this device with a bootstrap token; TOKEN - reads it from stdin.",
	"run": "run [--interval 30s] [--state-dir DIR]\n\n" +
		"Publish telemetry and keep the certificate fresh, until stopped.",
	"status": "status [--json] [--state-dir DIR]\n\n" +
		"Show the enrollment and connection state. Exit 0 when enrolled and sound, 1 when the\n" +
		"identity or state.json is broken, 3 when not enrolled.",
	"renew": "renew [--state-dir DIR]\n\nRenew the certificate now.",
}

// ExitNotEnrolled is the exit code of `status` on a device not enrolled:
// neither healthy (0) nor broken (1), and not a usage error (2).
const ExitNotEnrolled = 3

// Main runs the command line and returns the process exit code: 0 success,
// 1 failure, 2 usage error, ExitNotEnrolled from status.
func Main(ctx context.Context, args []string, std Stdio, version string) int {
	if len(args) == 0 {
		fmt.Fprint(std.Err, usage)
		return 2
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet("device-agent "+cmd, flag.ContinueOnError)
	fs.SetOutput(std.Err)
	// `device-agent enroll -h` shows the flags of enroll, not the list of
	// commands.
	fs.Usage = func() {
		fmt.Fprintf(std.Err, "usage: device-agent %s\n\nflags:\n", commandUsage[cmd])
		fs.PrintDefaults()
	}
	stateDir := fs.String("state-dir", "", "state `folder` (default $STATE_DIRECTORY, else "+DefaultStateDir+")")
	logLevel := fs.String("log-level", "info", "log `level`: debug, info, warn or error")

	var server, token, id, interval *string
	var force, asJSON *bool
	switch cmd {
	case "enroll":
		server = fs.String("server", "", "enrollment server `URL`, https://host:port (required)")
		token = fs.String("token", "", "bootstrap `token`; - reads it from stdin, out of ps and the shell history (required)")
		id = fs.String("id", "", "device `id` to ask for (default: the id the token is bound to)")
		force = fs.Bool("force", false, "enroll again, replacing the identity (stop run first)")
	case "run":
		interval = fs.String("interval", "30s", fmt.Sprintf("telemetry `period`, %s to %s", MinInterval, MaxInterval))
	case "status":
		asJSON = fs.Bool("json", false, "print JSON")
	case "renew":
	case "version", "--version", "-version":
		fmt.Fprintln(std.Out, version)
		return 0
	case "help", "-h", "--help", "-help":
		fmt.Fprint(std.Out, usage)
		return 0
	default:
		fmt.Fprintf(std.Err, "device-agent: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(std.Err, "device-agent %s: unexpected argument %q\n", cmd, fs.Arg(0))
		return 2
	}
	lvl, err := zerolog.ParseLevel(*logLevel)
	if err != nil || *logLevel == "" {
		fmt.Fprintf(std.Err, "device-agent: bad --log-level %q\n", *logLevel)
		return 2
	}
	cfg := Config{
		StateDir: *stateDir,
		Version:  version,
		Logger: zerolog.New(zerolog.ConsoleWriter{Out: std.Err, NoColor: true, TimeFormat: time.RFC3339}).
			Level(lvl).With().Timestamp().Logger(),
	}
	if cfg.StateDir == "" && std.Getenv != nil {
		cfg.StateDir = std.Getenv("STATE_DIRECTORY") // set by systemd's StateDirectory=
		// systemd joins several directories with ':'; ours is the first.
		cfg.StateDir, _, _ = strings.Cut(cfg.StateDir, ":")
	}
	fail := func(err error) int {
		dir := cfg.StateDir
		if dir == "" {
			dir = DefaultStateDir
		}
		fmt.Fprintf(std.Err, "device-agent %s: %v\n", cmd, permissionAdvice(err, dir, cmd, os.Geteuid()))
		return 1
	}

	switch cmd {
	case "enroll":
		tok := *token
		if tok == "-" {
			if tok, err = readLine(ctx, std.In); err != nil {
				return fail(fmt.Errorf("read token from stdin: %w", err))
			}
			if tok == "" {
				return fail(errors.New("--token -: the token read from stdin is empty (pipe or paste it in, then Enter)"))
			}
		}
		if *server == "" || tok == "" {
			fmt.Fprintln(std.Err, "device-agent enroll: --server and --token are required")
			return 2
		}
		res, err := Enroll(ctx, cfg, EnrollOptions{ServerURL: *server, Token: tok, DeviceID: *id, Force: *force})
		if err != nil {
			return fail(err)
		}
		if res.AlreadyEnrolled {
			fmt.Fprintf(std.Out, "already enrolled as %s (certificate valid until %s); nothing done, use --force to enroll again\n",
				res.DeviceID, res.NotAfter.Format(time.RFC3339))
			return 0
		}
		fmt.Fprintf(std.Out, "enrolled as %s; certificate valid until %s; broker %s\n",
			res.DeviceID, res.NotAfter.Format(time.RFC3339), res.BrokerURL)
	case "run":
		d, err := time.ParseDuration(*interval)
		if err != nil || d < MinInterval || d > MaxInterval {
			fmt.Fprintf(std.Err, "device-agent run: --interval must be a duration between %s and %s\n", MinInterval, MaxInterval)
			return 2
		}
		cfg.Interval = d
		if err := Run(ctx, cfg); err != nil {
			return fail(err)
		}
	case "status":
		s, err := ReadStatus(cfg.StateDir)
		if err != nil {
			return fail(err)
		}
		if *asJSON {
			enc := json.NewEncoder(std.Out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(s); err != nil {
				return fail(err)
			}
		} else if err := s.WriteText(std.Out, time.Now()); err != nil {
			return fail(err)
		}
		// `run` would fail: scripts and monitoring see it in the code.
		if s.Broken != "" {
			return 1
		}
		if !s.Enrolled {
			return ExitNotEnrolled
		}
	case "renew":
		res, err := Renew(ctx, cfg)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(std.Out, "renewed %s; certificate valid until %s\n", res.DeviceID, res.NotAfter.Format(time.RFC3339))
	}
	return 0
}

// readLine reads one line, without its newline, until ctx ends: main
// turns Ctrl-C and SIGTERM into ctx, so a person waiting at the prompt of
// --token - who changes their mind is not left with Ctrl-D as the only way
// out. The read itself cannot be interrupted; the process exits anyway.
func readLine(ctx context.Context, r io.Reader) (string, error) {
	if r == nil {
		return "", errors.New("no stdin")
	}
	type result struct {
		line string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			done <- result{"", err}
			return
		}
		done <- result{strings.TrimSpace(line), nil}
	}()
	select {
	case res := <-done:
		return res.line, res.err
	case <-ctx.Done():
		return "", fmt.Errorf("interrupted before a token was read: %w", ctx.Err())
	}
}
