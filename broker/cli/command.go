package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// commandHelp is `fleetmq device command -h`.
const commandHelp = `Usage: fleetmq device command ID NAME [PAYLOAD] [--wait 5s] [flags]

Publishes PAYLOAD (text, at most %d bytes; empty if not given) to
devices/ID/commands/NAME at QoS 1, as a backend with a service
certificate would. NAME is one or more topic levels (ping, config/set)
without wildcards. The device agent takes ping (answered on events/pong),
renew and interval (a duration, e.g. 10s), and refuses others on
events/error.

A device that is not connected, or does not subscribe to NAME, gets
nothing (device_offline, exit 1); one with a kept session gets it when
it comes back. --wait prints the device's next event and exits 1 when
none comes, when it is an error event, or when the device disconnects.
Each command is in the audit log by name; the payload is not recorded.

Flags:
`

// deviceCommand sends a command to a device through the server's broker,
// as a backend with a service certificate would, and with --wait prints
// the device's reply.
func deviceCommand(ctx context.Context, args []string, env Env) error {
	fs := newFlags("device command", env)
	var wait time.Duration
	fs.Var(durationValue{&wait}, "wait", fmt.Sprintf("wait this long (from %s to %s) for the device's next event, its reply, and print it; exit 1 if none comes", admin.MinCommandWait, admin.MaxCommandWait))
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), commandHelp, admin.MaxCommandPayload)
		fs.PrintDefaults()
	}
	if err := fs.parseFlags(args); err != nil {
		return err
	}
	if n := fs.NArg(); n < 2 || n > 3 {
		return usagef("device command takes ID NAME [PAYLOAD], got %d arguments: fleetmq device command pi-0001 ping", n)
	}
	id, name, payload := fs.Arg(0), fs.Arg(1), fs.Arg(2)
	if id == "" || id == "." || id == ".." {
		return usagef("device command: %q is not an ID; `fleetmq device list` shows the ids", id)
	}
	if name == "" {
		return usagef("device command: give a command NAME (the agent's: ping, renew, interval)")
	}
	if fs.given("wait") && (wait < admin.MinCommandWait || wait > admin.MaxCommandWait) {
		return usagef("--wait must be from %s to %s", admin.MinCommandWait, admin.MaxCommandWait)
	}
	if len(payload) > admin.MaxCommandPayload {
		return usagef("the payload is over %d bytes; a command takes at most that", admin.MaxCommandPayload)
	}
	req := admin.CommandRequest{Name: name, Payload: payload}
	if wait > 0 {
		req.Wait = wait.String()
	}
	// The answer starts only after the wait.
	client := admin.NewClientTimeout(filepath.Join(*fs.data, admin.SocketName), *fs.timeout+wait)
	res, err := client.Command(ctx, id, req)
	if err != nil {
		return unansweredf(err, "the command may have been sent all the same (`fleetmq audit --device %s` lists the commands sent)", id)
	}
	if *fs.json {
		if err := printJSON(env.Stdout, res); err != nil {
			return err
		}
	} else {
		where := "sent to " + id
		if !res.Online {
			where = "queued in the session " + id + " kept (it is not connected now)"
		}
		fmt.Fprintf(env.Stdout, "%s %s on %s\n", terminalSafe(name), where, terminalSafe(res.Topic))
		if res.Reply != nil {
			fmt.Fprintln(env.Stdout, recordLine(*res.Reply))
		}
	}
	if res.Disconnected {
		return fmt.Errorf("%s disconnected before answering: the command was sent, and it may have got it; `fleetmq device list --online` shows when it is back", id)
	}
	if wait > 0 && res.Reply == nil && !res.Online {
		return fmt.Errorf("no event from %s within %s: it is not connected; the command waits in the session it kept and goes out when it connects again", id, wait)
	}
	if wait > 0 && res.Reply == nil {
		return fmt.Errorf("no event from %s within %s: the command was sent, the device did not answer (the agent answers ping with events/pong and refuses commands with events/error; renew and interval send none)", id, wait)
	}
	// A refusal is the reply a script must not take for success: interval
	// and renew answer nothing when they work, and events/error when not.
	if res.Reply != nil && res.Reply.Topic == "devices/"+id+"/events/error" {
		return fmt.Errorf("%s refused the command: its reply on events/error, printed above, says why", id)
	}
	return nil
}
