package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// commandHelp is `fleetmq device command -h`.
const commandHelp = `Usage: fleetmq device command ID NAME [PAYLOAD] [--wait 5s] [flags]
       fleetmq device command (--all | --label k=v...) NAME [PAYLOAD] [--wait 5s] [flags]

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

--all sends to every device, --label k=v (repeatable: all must match) to
the devices with those labels; services and revoked devices never, at
most %d devices. All are sent first; --wait then collects the replies in
one window. It prints a line per device (--json: a record per device)
and a summary, and exits 1 unless every device got the command (with
--wait: and answered, not on events/error); one not connected is told,
not sent to, and the others are sent all the same.

Flags:
`

// deviceCommand sends a command to a device through the server's broker,
// as a backend with a service certificate would, and with --wait prints
// the device's reply.
func deviceCommand(ctx context.Context, args []string, env Env) error {
	fs := newFlags("device command", env)
	var wait time.Duration
	fs.Var(durationValue{&wait}, "wait", fmt.Sprintf("wait this long (from %s to %s) for the device's next event, its reply, and print it; exit 1 if none comes", admin.MinCommandWait, admin.MaxCommandWait))
	all := fs.Bool("all", false, "send to every device (not services, not revoked ones) rather than to ID")
	var labels []string
	fs.Var(listValue{&labels}, "label", "send to the devices with this k=v label rather than to ID (repeatable: all must match)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), commandHelp, admin.MaxCommandPayload, admin.MaxCommandDevices)
		fs.PrintDefaults()
	}
	if err := fs.parseFlags(args); err != nil {
		return err
	}
	if *all || len(labels) > 0 {
		return commandMany(ctx, fs, *all, labels, wait, env)
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
	if res.Refused {
		return fmt.Errorf("%s refused the command: its reply on events/error, printed above, says why", id)
	}
	return nil
}

// commandMany is `device command --all|--label`: one request for all the
// devices, a line for each and a summary.
func commandMany(ctx context.Context, fs flagSet, all bool, labels []string, wait time.Duration, env Env) error {
	if all && len(labels) > 0 {
		return usagef("device command: --all or --label, not both")
	}
	if n := fs.NArg(); n < 1 || n > 2 {
		return usagef("device command with --all or --label takes NAME [PAYLOAD], got %d arguments: fleetmq device command --all ping", n)
	}
	req := admin.CommandManyRequest{All: all, CommandRequest: admin.CommandRequest{Name: fs.Arg(0), Payload: fs.Arg(1)}}
	if req.Name == "" {
		return usagef("device command: give a command NAME (the agent's: ping, renew, interval)")
	}
	if fs.given("wait") && (wait < admin.MinCommandWait || wait > admin.MaxCommandWait) {
		return usagef("--wait must be from %s to %s", admin.MinCommandWait, admin.MaxCommandWait)
	}
	if len(req.Payload) > admin.MaxCommandPayload {
		return usagef("the payload is over %d bytes; a command takes at most that", admin.MaxCommandPayload)
	}
	if wait > 0 {
		req.Wait = wait.String()
	}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return usagef("--label wants k=v (as given to token create), got %q", l)
		}
		if _, dup := req.Labels[k]; dup {
			return usagef("--label %s given twice; a device has one value for it", k)
		}
		if req.Labels == nil {
			req.Labels = map[string]string{}
		}
		req.Labels[k] = v
	}
	client := admin.NewClientTimeout(filepath.Join(*fs.data, admin.SocketName), *fs.timeout+wait)
	res, err := client.CommandMany(ctx, req)
	if err != nil {
		return unansweredf(err, "the command may have been sent all the same (`fleetmq audit --since 10m` lists the commands sent)")
	}
	if *fs.json {
		if err := printJSON(env.Stdout, res.Devices); err != nil {
			return err
		}
	}
	counts := map[string]int{}
	failed := 0
	for _, d := range res.Devices {
		counts[d.Outcome]++
		if !d.Got(wait > 0) {
			failed++
		}
		if !*fs.json {
			fmt.Fprintln(env.Stdout, deviceOutcomeLine(d, wait))
		}
	}
	var parts []string
	for _, o := range []string{admin.OutcomeSent, admin.OutcomeReplied, admin.OutcomeRefused, admin.OutcomeNoReply,
		admin.OutcomeDisconnected, admin.OutcomeQueued, admin.OutcomeNotConnected, admin.OutcomeNotSubscribed, admin.OutcomeFailed} {
		if counts[o] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[o], strings.ReplaceAll(o, "_", " ")))
		}
	}
	devices := "devices"
	if len(res.Devices) == 1 {
		devices = "device"
	}
	summary := fmt.Sprintf("%s to %d %s: %s", terminalSafe(req.Name), len(res.Devices), devices, strings.Join(parts, ", "))
	if failed > 0 {
		what := "get it"
		if wait > 0 {
			what = "answer within " + wait.String()
		}
		return fmt.Errorf("%s; %d of %d did not %s (see the lines above)", summary, failed, len(res.Devices), what)
	}
	if *fs.json {
		fmt.Fprintln(env.Stderr, summary)
	} else {
		fmt.Fprintln(env.Stdout, summary)
	}
	return nil
}

// deviceOutcomeLine is one device's line of `device command --all`.
func deviceOutcomeLine(d admin.DeviceCommandResult, wait time.Duration) string {
	id := terminalSafe(d.DeviceID)
	switch d.Outcome {
	case admin.OutcomeReplied, admin.OutcomeRefused:
		return fmt.Sprintf("%s %s: %s", id, d.Outcome, recordLine(*d.Reply))
	case admin.OutcomeNoReply:
		return fmt.Sprintf("%s no reply within %s", id, wait)
	case admin.OutcomeDisconnected:
		return id + " disconnected before answering"
	case admin.OutcomeQueued:
		return id + " queued in the session it kept (it is not connected now)"
	case admin.OutcomeNotConnected:
		return id + " not connected: nothing sent"
	case admin.OutcomeNotSubscribed:
		return fmt.Sprintf("%s connected but not subscribed to %s: nothing sent", id, terminalSafe(d.Topic))
	case admin.OutcomeFailed:
		return id + " failed: the server's broker did not take the command (it is stopping); nothing sent"
	}
	return id + " " + terminalSafe(d.Outcome)
}
