package agent

import (
	"encoding/json"
	"strings"
	"time"
)

// Topic levels under devices/{id}/.
const (
	topicTelemetry = "telemetry"
	topicStatus    = "status"
	topicPong      = "events/pong"
	topicError     = "events/error"
	topicCommands  = "commands"
)

// maxCommandPayload bounds what a command may carry; ping echoes it back.
const maxCommandPayload = 4096

func deviceTopic(id, rel string) string { return "devices/" + id + "/" + rel }

type commandKind int

const (
	cmdPing commandKind = iota + 1
	cmdRenew
	cmdInterval
)

// command is a parsed, validated command. Nothing is executed while parsing.
type command struct {
	kind     commandKind
	name     string
	payload  []byte        // ping
	interval time.Duration // interval
}

// commandError is reported on devices/{id}/events/error.
type commandError struct {
	Code    string
	Message string
}

// parseCommand maps a message received on devices/{id}/commands/# to a
// command. Anything not understood is an error and is never executed.
// Retained commands are refused: the broker would replay them on every
// reconnect, and a retained "renew" would renew on every connection.
func parseCommand(deviceID, topic string, payload []byte, retained bool) (command, *commandError) {
	prefix := deviceTopic(deviceID, topicCommands) + "/"
	name, ok := strings.CutPrefix(topic, prefix)
	if !ok {
		return command{}, &commandError{"unknown_command", "not a command topic of this device"}
	}
	c := command{name: name}
	if retained {
		return c, &commandError{"retained_command", "retained commands are not executed"}
	}
	if len(payload) > maxCommandPayload {
		return c, &commandError{"payload_too_large", "command payload exceeds 4096 bytes"}
	}
	switch name {
	case "ping":
		c.kind, c.payload = cmdPing, payload
	case "renew":
		c.kind = cmdRenew
	case "interval":
		d, err := time.ParseDuration(strings.TrimSpace(string(payload)))
		if err != nil {
			return c, &commandError{"invalid_payload", `interval wants a duration such as "30s"`}
		}
		if d < MinInterval || d > MaxInterval {
			return c, &commandError{"invalid_payload", "interval must be between 1s and 24h"}
		}
		c.kind, c.interval = cmdInterval, d
	default:
		return c, &commandError{"unknown_command", "unknown command"}
	}
	return c, nil
}

// pongPayload answers a ping: the request payload is echoed as JSON if it is
// JSON, else as a string.
func pongPayload(now time.Time, request []byte) []byte {
	var echo any = string(request)
	if len(request) > 0 && json.Valid(request) {
		echo = json.RawMessage(request)
	}
	b, _ := json.Marshal(struct {
		Time    string `json:"time"`
		Request any    `json:"request"`
	}{now.UTC().Format(timeLayout), echo})
	return b
}

// errorEventPayload describes a refused command.
func errorEventPayload(now time.Time, name string, e *commandError) []byte {
	b, _ := json.Marshal(struct {
		Time    string `json:"time"`
		Command string `json:"command"`
		Code    string `json:"code"`
		Message string `json:"message"`
	}{now.UTC().Format(timeLayout), name, e.Code, e.Message})
	return b
}
