package broker

import (
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/fleetmq/fleetmq/store"
)

// Topic layout. Every grant lives under devices/{id}/; nothing else on the
// broker is reachable by a client.
const (
	topicRoot      = "devices"
	levelTelemetry = "telemetry"
	levelEvents    = "events"
	levelStatus    = "status"
	levelCommands  = "commands"
	levelConfig    = "config"

	// maxTopicLen bounds topics and filters. MQTT allows 65,535 bytes;
	// every topic of the grants below fits in a fraction of this, and a
	// stored telemetry message carries its topic next to its (capped)
	// payload.
	maxTopicLen = 512
)

// Allowed reports whether the identity id with role may publish to topic
// (write) or subscribe to the filter topic and receive messages published to
// it (!write; mochi asks with the raw filter on SUBSCRIBE and with the
// concrete topic on every delivery).
//
// Devices may publish devices/{id}/telemetry[/...], devices/{id}/events/...
// and devices/{id}/status, and subscribe to devices/{id}/config and to any
// filter inside devices/{id}/commands/#. Services may subscribe to any filter
// inside devices/+/telemetry/#, devices/+/status and devices/+/events/#, and
// publish to devices/{device}/commands/... for a concrete device. Everything
// else is denied: other roles, $-topics ($SYS, $share), empty levels, and
// wildcards anywhere but where a grant allows them.
func Allowed(role store.Role, id, topic string, write bool) bool {
	if !literalLevel(id) || !wellFormed(topic, write) {
		return false
	}
	lv := strings.Split(topic, "/")
	if len(lv) < 3 || lv[0] != topicRoot {
		return false
	}
	switch role {
	case store.RoleDevice:
		if lv[1] != id {
			return false
		}
		if write {
			return devicePublish(lv[2:])
		}
		return deviceSubscribe(lv[2:])
	case store.RoleService:
		if write {
			// A service commands one device at a time; write topics carry
			// no wildcards (wellFormed), so lv[1] names one device.
			return literalLevel(lv[1]) && lv[2] == levelCommands && len(lv) > 3
		}
		if lv[1] != "+" && !literalLevel(lv[1]) {
			return false
		}
		switch lv[2] {
		case levelTelemetry, levelEvents:
			return true // the rest is inside .../#, whatever it is
		case levelStatus:
			return len(lv) == 3
		}
	}
	return false
}

// devicePublish checks the levels after devices/{id}/ of a publish topic.
func devicePublish(rest []string) bool {
	switch rest[0] {
	case levelTelemetry:
		return true
	case levelEvents:
		return len(rest) > 1
	case levelStatus:
		return len(rest) == 1
	}
	return false
}

// deviceSubscribe checks the levels after devices/{id}/ of a subscription
// filter or delivered topic.
func deviceSubscribe(rest []string) bool {
	switch rest[0] {
	case levelCommands:
		return len(rest) > 1 // commands/# and anything inside it
	case levelConfig:
		return len(rest) == 1
	}
	return false
}

// unwanted reports the characters MQTT says topics should not hold
// (§1.5.4): control characters — NUL, and the escape sequences a topic would
// otherwise carry into an operator's terminal — and Unicode noncharacters.
func unwanted(r rune) bool {
	return unicode.IsControl(r) || (r >= 0xfdd0 && r <= 0xfdef) || r&0xfffe == 0xfffe
}

// wellFormed rejects what no grant may contain: empty or over-long topics,
// invalid UTF-8 and NUL, $-topics, empty levels, and wildcards that are not a
// whole level ('#' only as the last one); write topics take no wildcard.
// Control characters and noncharacters are refused too (see unwanted).
func wellFormed(topic string, write bool) bool {
	if topic == "" || len(topic) > maxTopicLen || topic[0] == '$' || !utf8.ValidString(topic) ||
		strings.IndexFunc(topic, unwanted) >= 0 {
		return false
	}
	n := strings.Count(topic, "/") + 1
	i := 0
	for level := range strings.SplitSeq(topic, "/") {
		i++
		switch {
		case level == "":
			return false
		case level == "+":
			if write {
				return false
			}
		case level == "#":
			if write || i != n {
				return false
			}
		case strings.ContainsAny(level, "+#"):
			return false
		}
	}
	return true
}

// literalLevel reports whether s can stand as one concrete topic level: an
// identity's id, or the device id of a service's topic.
func literalLevel(s string) bool {
	return s != "" && s[0] != '$' && !strings.ContainsAny(s, "/+#\x00")
}
