package admin

import (
	"context"
	"net/http"
	"net/url"
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
	var wait time.Duration
	if req.Wait != "" {
		d, err := ParseDuration(req.Wait)
		if err != nil || d < MinCommandWait || d > MaxCommandWait {
			return CommandResult{}, enroll.Errorf(enroll.CodeBadRequest, "wait %q: give a duration from %s to %s (e.g. 5s)", req.Wait, MinCommandWait, MaxCommandWait)
		}
		wait = d
	}
	if len(req.Payload) > MaxCommandPayload {
		return CommandResult{}, enroll.Errorf(enroll.CodeBodyTooLarge, "the payload has %d bytes; a command takes at most %d", len(req.Payload), MaxCommandPayload)
	}
	if !utf8.ValidString(req.Payload) {
		return CommandResult{}, enroll.Errorf(enroll.CodeBadRequest, "the payload is not UTF-8 text")
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
		res.Reply, res.ReplyMessage = &rec, sent.Reply
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

// Command sends command req.Name to device id (see Handler.Command).
func (c *Client) Command(ctx context.Context, id string, req CommandRequest) (CommandResult, error) {
	var out CommandResult
	return out, c.do(ctx, http.MethodPost, "/v1/devices/"+url.PathEscape(id)+"/commands", req, &out)
}
