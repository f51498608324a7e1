// Package cli is the fleetmq command line: `fleetmq serve` runs a node and
// every other subcommand is an operator command that talks to the running
// node over its admin socket (bbolt allows one process per database file).
package cli

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
)

// Version is stamped at build time.
var Version = "dev"

// Env is what a command may touch: its arguments, its streams and the
// process environment, all passed in so tests run commands in-process.
type Env struct {
	Stdin          io.Reader // default os.Stdin
	Stdout, Stderr io.Writer
	Getenv         func(string) string
}

// Main runs the command line and returns the process exit code.
func Main(ctx context.Context, args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	if env.Stdin == nil {
		env.Stdin = os.Stdin
	}
	err := run(ctx, args, env)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0 // asked for: the usage was printed
	case errors.As(err, new(usageError)):
		var ue usageError
		errors.As(err, &ue)
		if !ue.reported {
			fmt.Fprintf(env.Stderr, "fleetmq: %v\n", err)
		}
		return 2
	case badArguments(err):
		fmt.Fprintf(env.Stderr, "fleetmq: %v\n", err)
		return 2
	default:
		fmt.Fprintf(env.Stderr, "fleetmq: %v\n", err)
		return 1
	}
}

// badArguments reports whether err is the server refusing the command's
// arguments (a --ttl over its limit, a --since it cannot read, an id that
// cannot be one): a usage error the server caught rather than the CLI, so
// it exits 2 as those do. Refusals because of the fleet's state (already
// revoked, not found, taken) are not the arguments' fault and exit 1.
func badArguments(err error) bool {
	var e *admin.APIError
	return errors.As(err, &e) && (e.Code == enroll.CodeBadRequest || e.Code == enroll.CodeIDInvalid)
}

type usageError struct {
	msg      string
	reported bool // the flag package already printed it with the usage
}

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{msg: fmt.Sprintf(format, args...)} }

const usage = `fleetmq — mTLS enrollment and telemetry broker for device fleets

Usage:
  fleetmq [serve] [flags]              run the server (default)
  fleetmq token create [flags]         mint bootstrap tokens
  fleetmq token list [--limit N | --all] | revoke ID
  fleetmq device list [--online] [--expiring 7d] [--revoked] | show ID
  fleetmq device revoke ID [ID...] [--from FILE|-]
                                       revoke identities: all, or none if one is unknown
  fleetmq device command ID NAME [PAYLOAD] [--wait 5s]
  fleetmq device command (--all | --label k=v...) NAME [PAYLOAD] [--wait 5s]
                                       send a command (ping, renew, interval) to devices
  fleetmq service issue NAME [--out DIR] [--renew]
                                       certificate for a backend (telemetry, commands)
  fleetmq operator issue NAME [--out DIR] [--renew]
                                       certificate for the dashboard
  fleetmq telemetry ID [--since 1h] [--limit N] [--follow] [--json]
  fleetmq audit [--device ID] [--since 24h] [--limit N]
  fleetmq ca show
  fleetmq backup DIR                   copy of the database and CA, while it runs
  fleetmq dashboard                    one-time login code for the local dashboard
  fleetmq version [--json]

Operator commands find the server through the admin socket in the data
folder (--data, or $FLEETMQ_DATA, default ./fleetmq-data) and wait up to
--timeout (30s) for it to start answering. Most take --json.
Run 'fleetmq COMMAND -h' for its flags.
`

func run(ctx context.Context, args []string, env Env) error {
	args = commandFirst(args)
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		switch {
		case len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help"):
			fmt.Fprint(env.Stdout, usage)
			return nil
		case len(args) > 0 && (args[0] == "--version" || args[0] == "-version"):
			fmt.Fprintln(env.Stdout, "fleetmq", Version)
			return nil
		}
		return serve(ctx, args, env)
	}
	cmd, rest := args[0], args[1:]
	sub := func() (string, []string, error) {
		if len(rest) > 0 && isHelp(rest[0]) {
			fmt.Fprint(env.Stdout, groupUsage(cmd))
			return "", nil, flag.ErrHelp
		}
		if len(rest) == 0 || strings.HasPrefix(rest[0], "-") {
			fmt.Fprint(env.Stderr, groupUsage(cmd))
			return "", nil, usagef("%s needs a subcommand (listed above)", cmd)
		}
		return rest[0], rest[1:], nil
	}
	switch cmd {
	case "serve":
		return serve(ctx, rest, env)
	case "help":
		if len(rest) > 0 && groupUsage(rest[0]) != "" {
			fmt.Fprint(env.Stdout, groupUsage(rest[0]))
			return nil
		}
		fmt.Fprint(env.Stdout, usage)
		return nil
	case "version":
		fs := newFlags("version", env)
		if err := fs.parse(rest, 0); err != nil {
			return err
		}
		if *fs.json {
			return printJSON(env.Stdout, map[string]string{"version": Version})
		}
		fmt.Fprintln(env.Stdout, "fleetmq", Version)
		return nil
	case "token", "device", "service", "operator", "ca":
		name, more, err := sub()
		if err != nil {
			return err
		}
		fn, ok := operatorCommands[cmd+" "+name]
		if !ok {
			return usagef("unknown command %q; see 'fleetmq help'", cmd+" "+name)
		}
		return fn(ctx, more, env)
	case "telemetry":
		return telemetryCmd(ctx, rest, env)
	case "audit":
		return auditCmd(ctx, rest, env)
	case "backup":
		return backupCmd(ctx, rest, env)
	case "dashboard":
		return dashboardCmd(ctx, rest, env)
	}
	return usagef("unknown command %q; see 'fleetmq help'", cmd)
}

func isHelp(a string) bool { return a == "-h" || a == "--help" || a == "-help" }

// groupUsage lists the subcommands of a command group — the usage lines
// that start with it — or is "" for a word that is no group.
func groupUsage(group string) string {
	var b strings.Builder
	in := false
	for _, line := range strings.Split(usage, "\n") {
		switch {
		case strings.HasPrefix(line, "  fleetmq "+group+" "):
			in = true
		case in && strings.HasPrefix(line, "    "): // a continued line
		default:
			in = false
		}
		if in {
			b.WriteString(line + "\n")
		}
	}
	if b.Len() == 0 {
		return ""
	}
	return "Usage:\n" + b.String() + "\nRun 'fleetmq " + group + " SUBCOMMAND -h' for its flags.\n"
}

// commandFirst moves the flags every command shares (--data, --json,
// --timeout) from before a command to its end — `fleetmq --data
// /var/lib/fleetmq device list` — where the command's own flags parse
// them. Anything else before the first word stays, as flags of serve.
func commandFirst(args []string) []string {
	var lead []string
	i := 0
	for i < len(args) {
		a := args[i]
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch {
		case !strings.HasPrefix(a, "-"):
			if _, ok := commandWords[a]; !ok || len(lead) == 0 {
				return args
			}
			// Before a "--", after which they would be arguments.
			rest := args[i:]
			end := len(rest)
			if j := slices.Index(rest, "--"); j >= 0 {
				end = j
			}
			return slices.Concat(rest[:end], lead, rest[end:])
		case (name == "data" || name == "timeout") && !hasValue && i+1 < len(args):
			lead = append(lead, a, args[i+1])
			i += 2
		case name == "data" || name == "timeout" || name == "json":
			lead = append(lead, a)
			i++
		default:
			return args
		}
	}
	return args
}

// commandWords are the first words of the commands other than serve.
var commandWords = map[string]struct{}{
	"token": {}, "device": {}, "service": {}, "operator": {}, "ca": {},
	"telemetry": {}, "audit": {}, "backup": {}, "serve": {}, "dashboard": {},
}

var operatorCommands = map[string]func(context.Context, []string, Env) error{
	"token create":   tokenCreate,
	"token list":     tokenList,
	"token revoke":   tokenRevoke,
	"device list":    deviceList,
	"device show":    deviceShow,
	"device revoke":  deviceRevoke,
	"device command": deviceCommand,
	"service issue":  identityIssue("service"),
	"operator issue": identityIssue("operator"),
	"ca show":        caShow,
}

// flagSet is a FlagSet that reports errors instead of exiting, with the
// shared --data, --json and (for the commands that talk to the server)
// --timeout flags.
type flagSet struct {
	*flag.FlagSet
	data    *string
	json    *bool
	timeout *time.Duration
}

func newFlags(name string, env Env) flagSet {
	fs := flag.NewFlagSet("fleetmq "+name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	def := env.Getenv("FLEETMQ_DATA")
	if def == "" {
		def = "./fleetmq-data"
	}
	f := flagSet{
		FlagSet: fs,
		data:    fs.String("data", def, "data folder of the server (env FLEETMQ_DATA)"),
		json:    new(bool),
		timeout: new(time.Duration),
	}
	if name != "serve" { // the server prints logs, not results
		f.json = fs.Bool("json", false, "print JSON for scripts")
	}
	if name != "serve" && name != "version" {
		*f.timeout = admin.DefaultTimeout
		fs.Var(durationValue{f.timeout}, "timeout", "how long to wait for the server to take the request and start its answer (a backup or --follow then runs as long as it takes)")
	}
	return f
}

// given reports whether the flag name was set on the command line.
func (f flagSet) given(name string) bool {
	set := false
	f.Visit(func(fl *flag.Flag) { set = set || fl.Name == name })
	return set
}

// anyArgs, as the positional count of parse, takes any number.
const anyArgs = -1

// parse parses args and checks the number of positional arguments.
func (f flagSet) parse(args []string, positional int) error {
	if err := f.parseFlags(args); err != nil {
		return err
	}
	if positional != anyArgs && f.NArg() != positional {
		if positional == 0 {
			return usagef("%s takes no arguments besides flags", f.Name())
		}
		arg := cmp.Or(argNames[strings.TrimPrefix(f.Name(), "fleetmq ")], "ARG")
		if f.NArg() == 0 {
			return usagef("%s needs %s: %s %s", f.Name(), arg, f.Name(), arg)
		}
		return usagef("%s takes one %s, got %d arguments: %q", f.Name(), arg, f.NArg(), f.Args())
	}
	cmd := strings.TrimPrefix(f.Name(), "fleetmq ")
	for _, id := range f.Args() {
		if argNames[cmd] != "ID" || id != "" && id != "." && id != ".." {
			continue
		}
		// No id is empty or all dots, and the admin API's paths could not
		// carry one: "." or ".." would name another endpoint (a show of
		// "." got the device list and failed to decode it, as if the
		// server had not answered).
		list := "device list"
		if strings.HasPrefix(cmd, "token ") {
			list = "token list"
		}
		return usagef("%s: %q is not an ID; `fleetmq %s` shows the ids", f.Name(), id, list)
	}
	return nil
}

// argNames names the one argument of the commands that take one, for
// their usage errors.
var argNames = map[string]string{
	"token revoke": "ID", "device show": "ID", "device revoke": "ID", "telemetry": "ID",
	"service issue": "NAME", "operator issue": "NAME", "backup": "DIR",
}

// parseFlags parses args, for a command that checks its positional
// arguments itself.
func (f flagSet) parseFlags(args []string) error {
	if err := f.Parse(f.interleave(args)); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{msg: err.Error(), reported: true}
	}
	if f.given("timeout") && *f.timeout <= 0 {
		return usagef("--timeout must be more than 0 (e.g. 30s, 2m)")
	}
	return nil
}

// interleave moves positional arguments after flags so that
// `fleetmq device show pi-1 --json` works as people type it. Whether a
// flag takes the next argument is the flag set's own answer.
func (f flagSet) interleave(args []string) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			pos = append(pos, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "-"):
			flags = append(flags, a)
			if !strings.Contains(a, "=") && i+1 < len(args) && !f.isBool(a) {
				flags = append(flags, args[i+1])
				i++
			}
		default:
			pos = append(pos, a)
		}
	}
	// "--" goes before the positional arguments, which the flag package
	// would otherwise take for flags when one starts with "-" (a backup
	// folder named -2026-12-07, given after "--" as is the custom).
	return append(append(flags, "--"), pos...)
}

// isBool reports whether the flag a (-name or --name) is a boolean one,
// which takes no separate value.
func (f flagSet) isBool(a string) bool {
	fl := f.Lookup(strings.TrimLeft(a, "-"))
	if fl == nil {
		return false
	}
	b, ok := fl.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

func (f flagSet) client() *admin.Client {
	return admin.NewClientTimeout(filepath.Join(*f.data, admin.SocketName), *f.timeout)
}

// durationValue is a flag.Value using admin.ParseDuration.
type durationValue struct{ d *time.Duration }

func (v durationValue) String() string {
	if v.d == nil || *v.d == 0 {
		return ""
	}
	if *v.d%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", *v.d/(24*time.Hour))
	}
	return v.d.String()
}

func (v durationValue) Set(s string) error {
	d, err := admin.ParseDuration(s)
	if err != nil {
		return err
	}
	if d < 0 {
		return fmt.Errorf("negative duration %q", s)
	}
	*v.d = d
	return nil
}

// listValue collects a repeatable flag.
type listValue struct{ l *[]string }

func (v listValue) String() string {
	if v.l == nil {
		return ""
	}
	return strings.Join(*v.l, ",")
}

func (v listValue) Set(s string) error { *v.l = append(*v.l, s); return nil }
