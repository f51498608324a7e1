package admin

import (
	"context"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

const (
	// MaxCommandPayload bounds a command's payload. The agent's commands
	// take a few bytes (ping echoes at most 4 KiB); other firmware may
	// take more, but a command is no file transfer.
	MaxCommandPayload = 64 << 10
	// MaxCommandWait bounds how long a command waits for the device's
	// reply: longer, and the device is not answering.
	MaxCommandWait = time.Minute
	// MinCommandWait is the shortest wait for a reply: less is no time
	// for a device to answer over a network, and a reply missed that way
	// fails the command that went out.
	MinCommandWait = time.Second
)

// CommandRequest is a command for a device.
type CommandRequest struct {
	// Name is the command: the topic levels after devices/{id}/commands/
	// (ping, config/set).
	Name string `json:"name"`
	// Payload is the command's text; commands are text (the agent's take
	// a duration, or anything to echo).
	Payload string `json:"payload"`
	// Wait, a duration (e.g. 5s, at most MaxCommandWait), waits for the
	// device's next event after the command and returns it. Empty: no
	// waiting.
	Wait string `json:"wait,omitempty"`
}

// CommandResult says what a command did.
type CommandResult struct {
	DeviceID string `json:"device_id"`
	Topic    string `json:"topic"`
	// Online: the device is connected, and the command was handed to its
	// connection; otherwise it waits in a session the device kept (the
	// device agent keeps none).
	Online bool `json:"online"`
	// Waited is how long the command waited for a reply; Reply is the
	// reply, absent when none came within it.
	Waited string           `json:"waited,omitempty"`
	Reply  *TelemetryRecord `json:"reply,omitempty"`
	// Disconnected: the device's connection closed while the command
	// waited, before a reply came, which ended the wait.
	Disconnected bool `json:"disconnected,omitempty"`
	// Refused: the reply is on the device's events/error, a refusal of
	// the command (see refusedBy).
	Refused bool `json:"refused,omitempty"`
	// ReplyMessage is the reply as the device sent it, for front ends in
	// the same process (the dashboard).
	ReplyMessage *store.Message `json:"-"`
}

// Sent is what Config.Command reports: where it published and the
// device's reply, if it waited for one and one came.
type Sent struct {
	Topic  string
	Online bool
	Reply  *store.Message
	// Gone: the device disconnected while the command waited for its
	// reply, before one came.
	Gone bool
	// Err, from Config.CommandMany only: why nothing went to this device
	// (device_offline), the others being sent all the same.
	Err error
}

func (h *Handler) command(w http.ResponseWriter, r *http.Request) {
	var req CommandRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	res, err := h.Command(r.Context(), r.PathValue("id"), req, remote)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// Command sends command req.Name to device id and, when req.Wait asks for it,
// waits for the device's reply. Only devices take commands, not revoked
// ones, and only while something subscribes to the command's topic: a
// command that would reach no one is refused (device_offline), not
// dropped in silence.
func (h *Handler) Command(ctx context.Context, id string, req CommandRequest, remote string) (CommandResult, error) {
	name := req.Name
	if h.cfg.Command == nil {
		return CommandResult{}, enroll.Errorf(enroll.CodeNotFound, "this server sends no commands")
	}
	wait, err := commandWait(req)
	if err != nil {
		return CommandResult{}, err
	}
	d, err := h.st.Device(ctx, id)
	if err != nil {
		return CommandResult{}, named(err, "device", id)
	}
	switch {
	case d.Role != store.RoleDevice:
		return CommandResult{}, enroll.Errorf(enroll.CodeIDMismatch, "%s is a %s; commands go to devices", id, d.Role)
	case d.Revoked():
		return CommandResult{}, enroll.Errorf(enroll.CodeDeviceRevoked, "%s was revoked; it takes no commands", id)
	}
	sent, err := h.cfg.Command(ctx, id, name, []byte(req.Payload), wait)
	if err != nil {
		return CommandResult{}, err
	}
	res := CommandResult{DeviceID: id, Topic: sent.Topic, Online: sent.Online, Disconnected: sent.Gone}
	if wait > 0 {
		res.Waited = wait.String()
	}
	if sent.Reply != nil {
		rec := Record(*sent.Reply)
		res.Reply, res.ReplyMessage, res.Refused = &rec, sent.Reply, refusedBy(id, sent.Reply)
	}
	// The name, not the payload: a payload may carry what an audit log
	// must not (a command's secret).
	ev := store.AuditEvent{Time: h.cfg.Now(), Action: store.ActDeviceCommand, DeviceID: id, Remote: remote, Detail: name}
	if err := h.st.AppendAudit(context.WithoutCancel(ctx), ev); err != nil {
		h.cfg.Logger.Error().Err(err).Str("device", id).Msg("audit a command")
	}
	h.cfg.Logger.Info().Str("device", id).Str("command", name).Str("by", remote).Bool("online", sent.Online).Bool("replied", sent.Reply != nil).Msg("command sent")
	return res, nil
}

// commandWait checks the wait and payload of req, and returns the wait.
func commandWait(req CommandRequest) (time.Duration, error) {
	var wait time.Duration
	if req.Wait != "" {
		d, err := ParseDuration(req.Wait)
		if err != nil || d < MinCommandWait || d > MaxCommandWait {
			return 0, enroll.Errorf(enroll.CodeBadRequest, "wait %q: give a duration from %s to %s (e.g. 5s)", req.Wait, MinCommandWait, MaxCommandWait)
		}
		wait = d
	}
	if len(req.Payload) > MaxCommandPayload {
		return 0, enroll.Errorf(enroll.CodeBodyTooLarge, "the payload has %d bytes; a command takes at most %d", len(req.Payload), MaxCommandPayload)
	}
	if !utf8.ValidString(req.Payload) {
		return 0, enroll.Errorf(enroll.CodeBadRequest, "the payload is not UTF-8 text")
	}
	return wait, nil
}

// Command sends command req.Name to device id (see Handler.Command).
func (c *Client) Command(ctx context.Context, id string, req CommandRequest) (CommandResult, error) {
	var out CommandResult
	return out, c.do(ctx, http.MethodPost, "/v1/devices/"+url.PathEscape(id)+"/commands", req, &out)
}

// MaxCommandDevices bounds the devices one command request goes to: a
// larger fleet is addressed by label, a part at a time.
const MaxCommandDevices = 10_000

// CommandManyRequest is a command for several devices: every device
// (All), or those whose labels include all of Labels. Services and
// revoked devices are never among them.
type CommandManyRequest struct {
	CommandRequest
	All    bool              `json:"all,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// What a command did to one device of a CommandManyRequest.
const (
	OutcomeSent          = "sent"           // handed to its connection; no wait asked
	OutcomeQueued        = "queued"         // put in the session it kept while away; no reply within the wait, if any
	OutcomeReplied       = "replied"        // its next event came within the wait
	OutcomeRefused       = "refused"        // its next event was on events/error
	OutcomeNoReply       = "no_reply"       // connected, sent, no event within the wait
	OutcomeDisconnected  = "disconnected"   // its connection closed during the wait, before a reply
	OutcomeNotConnected  = "not_connected"  // nothing sent: no connection nor kept session
	OutcomeNotSubscribed = "not_subscribed" // nothing sent: connected, not subscribed to the command
	OutcomeFailed        = "failed"         // nothing sent: the broker could not take it (it is stopping)
)

// DeviceCommandResult is one device's part of a CommandManyResult.
type DeviceCommandResult struct {
	DeviceID string           `json:"device_id"`
	Outcome  string           `json:"outcome"`
	Topic    string           `json:"topic"`
	Online   bool             `json:"online"`
	Reply    *TelemetryRecord `json:"reply,omitempty"`
}

// Got reports whether the device got the command and, when waited is
// set, answered it without an error event.
func (r DeviceCommandResult) Got(waited bool) bool {
	if waited {
		return r.Outcome == OutcomeReplied
	}
	return r.Outcome == OutcomeSent || r.Outcome == OutcomeQueued
}

// CommandManyResult says what a command did to each device it targeted,
// in the order of their ids.
type CommandManyResult struct {
	Name    string                `json:"name"`
	Waited  string                `json:"waited,omitempty"`
	Devices []DeviceCommandResult `json:"devices"`
}

func (h *Handler) commandMany(w http.ResponseWriter, r *http.Request) {
	var req CommandManyRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	res, err := h.CommandMany(r.Context(), req, remote)
	if err != nil {
		writeErr(w, h.cfg.Logger, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// CommandMany sends command req.Name to the devices req selects, each
// as Handler.Command would, but in one wait: all are sent first, then
// the replies are collected in a single window of req.Wait. A device
// that nothing was sent to (not connected) is an outcome, not an error
// of the request; a request that selects no device, or more than
// MaxCommandDevices, is refused.
func (h *Handler) CommandMany(ctx context.Context, req CommandManyRequest, remote string) (CommandManyResult, error) {
	if h.cfg.CommandMany == nil {
		return CommandManyResult{}, enroll.Errorf(enroll.CodeNotFound, "this server sends no commands to many devices")
	}
	wait, err := commandWait(req.CommandRequest)
	if err != nil {
		return CommandManyResult{}, err
	}
	if req.All == (len(req.Labels) > 0) {
		return CommandManyResult{}, enroll.Errorf(enroll.CodeBadRequest, "give either all or labels to choose the devices")
	}
	devs, err := h.st.Devices(ctx)
	if err != nil {
		return CommandManyResult{}, err
	}
	var ids []string
	for _, d := range devs {
		if d.Role == store.RoleDevice && !d.Revoked() && hasLabels(d.Labels, req.Labels) {
			ids = append(ids, d.ID)
		}
	}
	switch {
	case len(ids) == 0 && req.All:
		return CommandManyResult{}, enroll.Errorf(enroll.CodeNotFound, "no device to send to: the fleet has no device that is not revoked")
	case len(ids) == 0:
		return CommandManyResult{}, enroll.Errorf(enroll.CodeNotFound, "no device that is not revoked has the labels %s; `fleetmq device list` shows the labels", labelList(req.Labels))
	case len(ids) > MaxCommandDevices:
		return CommandManyResult{}, enroll.Errorf(enroll.CodeBadRequest, "%d devices selected; a command goes to at most %d: choose fewer with labels (nothing was sent)", len(ids), MaxCommandDevices)
	}
	sent, err := h.cfg.CommandMany(ctx, ids, req.Name, []byte(req.Payload), wait)
	if err != nil {
		return CommandManyResult{}, err
	}
	res := CommandManyResult{Name: req.Name, Devices: make([]DeviceCommandResult, len(ids))}
	if wait > 0 {
		res.Waited = wait.String()
	}
	now := h.cfg.Now()
	var evs []store.AuditEvent
	replied := 0
	for i, id := range ids {
		s := sent[i]
		out := DeviceCommandResult{DeviceID: id, Topic: s.Topic, Online: s.Online, Outcome: commandOutcome(id, s, wait)}
		if s.Reply != nil {
			rec := Record(*s.Reply)
			out.Reply = &rec
			replied++
		}
		res.Devices[i] = out
		if s.Err == nil {
			// The name, not the payload, as for one device.
			evs = append(evs, store.AuditEvent{Time: now, Action: store.ActDeviceCommand, DeviceID: id, Remote: remote, Detail: req.Name})
		}
	}
	if err := h.st.AppendAudit(context.WithoutCancel(ctx), evs...); err != nil {
		h.cfg.Logger.Error().Err(err).Int("devices", len(evs)).Msg("audit a command to many devices")
	}
	h.cfg.Logger.Info().Str("command", req.Name).Str("by", remote).Int("devices", len(ids)).Int("sent", len(evs)).Int("replied", replied).Msg("command sent to many devices")
	return res, nil
}

// commandOutcome names what the command did to one device.
func commandOutcome(id string, s Sent, wait time.Duration) string {
	switch {
	case s.Err != nil && enroll.AsError(s.Err).Code != enroll.CodeDeviceOffline:
		return OutcomeFailed
	case s.Err != nil && s.Online:
		return OutcomeNotSubscribed
	case s.Err != nil:
		return OutcomeNotConnected
	case refusedBy(id, s.Reply):
		return OutcomeRefused
	case s.Reply != nil:
		return OutcomeReplied
	case s.Gone:
		return OutcomeDisconnected
	case !s.Online:
		return OutcomeQueued
	case wait > 0:
		return OutcomeNoReply
	}
	return OutcomeSent
}

// refusedBy reports whether reply, the event device id answered a command
// with, refuses it: the device agent answers an unknown, malformed or too
// frequent command on events/error, and renew and interval with nothing
// when they work, so a script must not take that reply for success.
func refusedBy(id string, reply *store.Message) bool {
	return reply != nil && reply.Topic == "devices/"+id+"/events/error"
}

// hasLabels reports whether labels include every pair of want.
func hasLabels(labels, want map[string]string) bool {
	for k, v := range want {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// labelList prints labels as sorted k=v pairs.
func labelList(labels map[string]string) string {
	pairs := make([]string, 0, len(labels))
	for k, v := range labels {
		pairs = append(pairs, strconv.Quote(k+"="+v))
	}
	slices.Sort(pairs)
	return strings.Join(pairs, ", ")
}

// CommandMany sends command req.Name to the devices req selects (see
// Handler.CommandMany).
func (c *Client) CommandMany(ctx context.Context, req CommandManyRequest) (CommandManyResult, error) {
	var out CommandManyResult
	return out, c.do(ctx, http.MethodPost, "/v1/commands", req, &out)
}
