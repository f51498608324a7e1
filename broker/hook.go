package broker

import (
	"context"
	"strings"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/store"
)

// maxSubscriptions is the most subscription filters one client may hold:
// a device needs two, a service a handful; each costs broker memory.
const maxSubscriptions = 100

// hook is the broker's only mochi hook: authentication, ACLs, rate limit,
// telemetry capture and counters. mochi ORs the answers of auth and ACL
// hooks, so no other hook providing them may ever be added.
type hook struct {
	mqtt.HookBase
	b *Broker
}

func (h *hook) ID() string { return "fleetmq-auth" }

func (h *hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck,
		mqtt.OnSubscribe, mqtt.OnSubscribed, mqtt.OnUnsubscribed,
		mqtt.OnPublish, mqtt.OnPacketSent, mqtt.OnClientExpired,
		mqtt.OnPacketRead, mqtt.OnPublishDropped, mqtt.OnRetainMessage, mqtt.OnQosComplete,
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished:
		return true
	}
	return false
}

// OnConnect authorizes the CONNECT. It runs before mochi's authentication
// step so that a refusal can be answered with "not authorized" (mochi's own
// refusal says "bad username or password" to MQTT 5 clients).
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	b := h.b
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return packets.ErrNotAuthorized // not from the broker's listener
	}
	c.connectSeen.Store(true)
	r := b.authorize(c, cl, pk)
	if r == nil {
		c.raw.connected()
		return nil
	}
	b.stats.refused.inc(r.reason)
	ev := b.log.Info().Err(r.err).Str("remote", cl.Net.Remote).Str("reason", r.reason)
	if leaf := c.leaf(); leaf != nil {
		ev = ev.Str("cn", leaf.Subject.CommonName)
	}
	ev.Msg("broker: connection refused")
	code := packets.ErrNotAuthorized
	if cl.Properties.ProtocolVersion < 5 {
		// mochi turns this code into the MQTT 3.1.1 return code 5, "not
		// authorized"; 0x87 itself has no 3.1.1 mapping.
		code = packets.ErrBadUsernameOrPassword
	}
	_ = b.srv.SendConnack(cl, code, false, nil)
	return r
}

// authorize decides a CONNECT: the identity is the verified certificate's
// CN, the client id must be that CN (an MQTT 5 client sending none is
// assigned it), and the store must know the certificate and the identity,
// neither revoked, with a role that may use MQTT.
func (b *Broker) authorize(c *conn, cl *mqtt.Client, pk packets.Packet) *refusal {
	leaf := c.leaf()
	if leaf == nil {
		return refuse(ReasonNoCertificate, nil)
	}
	id := leaf.Subject.CommonName
	if id == mqtt.InlineClientId || !literalLevel(id) {
		// "inline" would replace mochi's inline client in its client map.
		return refuse(ReasonClientID, nil)
	}
	if pk.Properties.AuthenticationMethod != "" {
		return refuse(ReasonAuthMethod, nil)
	}
	switch {
	case pk.Connect.ClientIdentifier == "" && cl.Properties.ProtocolVersion == 5:
		cl.ID = id
		cl.Properties.Props.AssignedClientID = id
	case pk.Connect.ClientIdentifier != id:
		return refuse(ReasonClientID, nil)
	}
	if !b.register(c, cl, id) {
		return refuse(ReasonRevoked, errRevoked)
	}
	dev, r := b.checkLeaf(context.Background(), leaf)
	if r != nil {
		return r
	}
	if dev.Role != store.RoleDevice && dev.Role != store.RoleService {
		return refuse(ReasonRole, nil)
	}
	// mochi publishes the will without an ACL check.
	if pk.Connect.WillFlag {
		if !Allowed(dev.Role, id, pk.Connect.WillTopic, true) {
			return refuse(ReasonWill, nil)
		}
		if !retainable(dev.Role, id, pk.Connect.WillTopic) {
			cl.Properties.Will.Retain = false
		}
		// mochi waits the whole will delay even after the session has
		// ended, which MQTT 5 says ends the wait (3.1.3.2.2): a device
		// could schedule a publish for years ahead.
		if maxDelay := uint32(b.cfg.SessionExpiry / time.Second); cl.Properties.Will.WillDelayInterval > maxDelay {
			cl.Properties.Will.WillDelayInterval = maxDelay
		}
	}
	// mochi resends a kept session's unacknowledged messages on the next
	// connection with the topic alias of the connection they were first
	// sent on, as a publish without a topic name that the new connection
	// cannot resolve: a v5 subscriber allowing aliases would lose them on
	// every reconnect. The broker uses no outbound aliases.
	cl.Properties.Props.TopicAliasMaximum = 0
	// mochi holds back deliveries beyond an MQTT 5 client's Receive
	// Maximum and, after every packet the client sends while its send
	// quota is open, looks for one to release with Inflight.NextImmediate,
	// which read-locks the in-flight table twice: a delivery to the client
	// from another goroutine locking it in between deadlocked the table,
	// then every publisher delivering to the client, the broker's Close
	// with them. It also released held-back messages by the second only,
	// out of order, and lost quota on takeovers. With no send quota mochi
	// never holds back nor calls it; the in-flight table (maxInflight)
	// bounds what a client has unacknowledged, and the retained
	// deliveries keep to half its Receive Maximum (see retained.go).
	c.receiveMax = cl.Properties.Props.ReceiveMaximum
	cl.Properties.Props.ReceiveMaximum = 0 // mochi resets the quota from it on a session takeover
	cl.State.Inflight.ResetSendQuota(0)
	// mochi closes a connection silent for 1.5 keepalives, and keeps none
	// for keepalive 0: cap it, so a dead peer is always noticed.
	if maxKA := uint16(b.cfg.MaxKeepalive / time.Second); cl.State.Keepalive == 0 || cl.State.Keepalive > maxKA {
		cl.State.Keepalive = maxKA
		cl.State.ServerKeepalive = true
	}
	g := &grant{id: id, role: dev.Role, telemetry: topicRoot + "/" + id + "/" + levelTelemetry}
	if !b.activate(c, g, leaf.NotAfter) {
		return refuse(ReasonRevoked, errRevoked)
	}
	return nil
}

// OnConnectAuthenticate admits only connections OnConnect authorized.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	c, ok := cl.Net.Conn.(*conn)
	return ok && c.grant.Load() != nil && !c.revoked.Load()
}

// OnACLCheck applies Allowed to publishes, subscription filters and each
// delivery, and refuses reading a lately revoked identity's topics (see
// silence.go).
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if c, ok := cl.Net.Conn.(*conn); ok && c.allowed(topic, write) && (write || !h.b.silencedTopic(topic)) {
		return true
	}
	h.b.stats.aclDenied.Add(1)
	return false
}

// OnSubscribe turns filters beyond maxSubscriptions into invalid ones,
// which mochi refuses in the SUBACK (see overLimit), and takes over the
// sending of a service's retained messages (see retained.go).
func (h *hook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	n := cl.State.Subscriptions.Len()
	c, _ := cl.Net.Conn.(*conn)
	if c != nil {
		c.overLimit = c.overLimit[:0]
	}
	for i, f := range pk.Filters {
		if _, ok := cl.State.Subscriptions.Get(f.Filter); ok {
			continue
		}
		if n >= maxSubscriptions {
			pk.Filters[i].Filter = ""
			h.b.stats.subLimit.Add(1)
			if c != nil {
				c.overLimit = append(c.overLimit, i)
			}
			continue
		}
		n++
	}
	if c, ok := takesRetained(cl); ok {
		c.holdRetained(cl, &pk)
	}
	return pk
}

// OnPublish runs after the ACL check and before mochi acknowledges. It
// applies the rate limit and stores device telemetry: QoS 0 is queued for
// the writer; QoS 1 is acknowledged once committed, in publish order (see
// ack.go); QoS 2 waits here for its commit, as mochi's PUBREC follows.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	b := h.b
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return pk, packets.ErrRejectPacket
	}
	if c.shadowed != nil {
		b.keepOutbound(cl, c, pk.PacketID)
	}
	g := c.grant.Load()
	if g == nil {
		return pk, packets.ErrRejectPacket
	}
	qos := min(pk.FixedHeader.Qos, 2)
	b.stats.in[qos].Add(1)

	code := packets.CodeSuccess
	var m *store.Message // telemetry to store
	switch {
	case !b.allowPublish(cl, c):
		b.stats.rateLimited.Add(1)
		code = packets.ErrMessageRateTooHigh
	case g.role == store.RoleDevice && isUnder(pk.TopicName, g.telemetry):
		if len(pk.Payload) > b.cfg.MaxTelemetryPayload {
			b.stats.tooLarge.Add(1)
			code = packets.ErrPacketTooLarge
			break
		}
		m = &store.Message{
			DeviceID: g.id,
			Topic:    pk.TopicName,
			Received: b.cfg.Now(),
			QoS:      qos,
			Payload:  pk.Payload,
		}
	}
	if b.events.n.Load() > 0 && code == packets.CodeSuccess && g.role == store.RoleDevice {
		b.noteEvent(g.id, &pk) // a reply an operator's command waits for (see command.go)
	}
	if code == packets.CodeSuccess && qos == 1 && g.role == store.RoleService &&
		cl.Properties.ProtocolVersion == 5 && !b.hasSubscribers(pk.TopicName) {
		// A command to a device that is not connected, and keeps no
		// session (the agent keeps none), reaches no one: MQTT 5 lets
		// the server say so (a success code, as mosquitto sends), so a
		// backend can tell it from one delivered.
		code = packets.CodeNoMatchingSubscribers
	}
	if pk.FixedHeader.Retain && !retainable(g.role, g.id, pk.TopicName) {
		// Only the status topic keeps a retained message, so retained
		// messages are bounded by the number of devices.
		pk.FixedHeader.Retain = false
	}

	switch qos {
	case 0:
		if code != packets.CodeSuccess {
			return pk, packets.ErrRejectPacket
		}
		if m != nil && !b.w.storeAsync(*m) {
			b.stats.dropped.Add(1)
		}
		if !pk.FixedHeader.Retain && b.unwatched(g) {
			return handedOver(pk), nil // nobody could receive it
		}
		return pk, nil
	case 1:
		// mochi encodes a success reason other than 0 as 0: the acker
		// writes that PUBACK itself.
		if m == nil && c.acksIdle() && code != packets.CodeNoMatchingSubscribers {
			// Nothing queued ahead: mochi may answer now, in order.
			return pk, b.refusePublish(cl, pk.PacketID, qos, code)
		}
		p := &pendingPub{id: pk.PacketID, code: code, done: m == nil}
		if pk.FixedHeader.Retain || !b.unwatched(g) {
			deliver := pk
			p.pk = &deliver
		}
		if !c.enqueueAck(p) {
			return pk, packets.ErrRejectPacket
		}
		if m != nil {
			b.w.storeAcked(*m, c, p)
		}
		return handedOver(pk), nil // acknowledged and delivered by the acker
	default:
		if code == packets.CodeSuccess && m != nil {
			if err := b.w.store(*m); err != nil {
				b.log.Warn().Err(err).Str("id", g.id).Msg("broker: telemetry not stored, not acknowledged")
				code = packets.ErrUnspecifiedError
			}
		}
		return pk, b.refusePublish(cl, pk.PacketID, qos, code)
	}
}

// OnPacketRead caps the session expiry an MQTT 5 client may set in its
// DISCONNECT: mochi caps the one asked for in CONNECT but takes the
// DISCONNECT's as it is, which would keep a session, its subscriptions and
// its queued messages for up to 136 years. (Changed here, before mochi
// handles the packet, the value is written before the session is marked
// disconnected, which mochi's expiry loop reads it after.)
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return pk, nil
	}
	c.shadowed = nil // it belonged to the packet read before this one
	switch pk.FixedHeader.Type {
	case packets.Disconnect:
		if maxExp := uint32(h.b.cfg.SessionExpiry / time.Second); pk.Properties.SessionExpiryInterval > maxExp {
			pk.Properties.SessionExpiryInterval = maxExp
		}
	case packets.Publish:
		// mochi holds the messages it sends and those it receives in one
		// in-flight table by packet id, though ids are per direction
		// (MQTT 5 2.2.1), and on a PUBLISH it deletes the entry of that
		// id: a command sent to the client and not yet acknowledged, when
		// the client numbers its own publishes as mochi does (from 1) and
		// both sides send. The command would not be sent again after a
		// reconnect. mochi's PUBREC to a QoS 2 publish of the client is
		// the only entry of the client's own; the others are what it sent.
		if pk.FixedHeader.Qos != 1 {
			break
		}
		if out, ok := cl.State.Inflight.Get(pk.PacketID); ok && out.FixedHeader.Type != packets.Pubrec {
			c.shadowed = &out
		}
	}
	return pk, nil
}

// keepOutbound puts back into the in-flight table of c's client the
// message of packet id id that mochi dropped while handling the client's
// QoS 1 PUBLISH with that id (see OnPacketRead). mochi drops it before
// OnPublish, and, when it acknowledges the publish itself, again with its
// own record of the PUBACK, before OnQosComplete: both call it.
func (b *Broker) keepOutbound(cl *mqtt.Client, c *conn, id uint16) {
	out := c.shadowed
	if out == nil || out.PacketID != id {
		return
	}
	if _, taken := cl.State.Inflight.Get(id); !taken && cl.State.Inflight.Set(*out) {
		atomic.AddInt64(&b.srv.Info.Inflight, 1) // mochi counted it out
	}
}

// OnQosComplete runs when mochi has deleted a QoS 1/2 exchange from the
// in-flight table: also the PUBACK it sends for a QoS 1 publish, which
// shares the id of a message dropped for it (see keepOutbound).
func (h *hook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return
	}
	if c.shadowed != nil {
		h.b.keepOutbound(cl, c, pk.PacketID)
	}
	c.inflightFreed()
}

// OnPublishDropped counts deliveries mochi dropped because the receiving
// client had WriteQueue packets waiting to be written.
func (h *hook) OnPublishDropped(_ *mqtt.Client, _ packets.Packet) {
	h.b.stats.deliveryDropped.Add(1)
}

// OnPacketSent counts deliveries, starts a service's retained deliveries
// once the SUBACK before them is written, and, after the CONNACK of a
// resumed session, puts its messages in order before mochi resends them
// (see resend.go) and goes on with the retained deliveries its previous
// connection did not finish.
func (h *hook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	switch pk.FixedHeader.Type {
	case packets.Publish:
		h.b.stats.out[min(pk.FixedHeader.Qos, 2)].Add(1)
	case packets.Suback:
		if c, ok := cl.Net.Conn.(*conn); ok {
			h.b.sendRetained(c, pk.PacketID)
		}
	case packets.Connack:
		// With a maximum message expiry, mochi would also read Created
		// to expire in-flight messages, and take the ranks for ancient.
		c, ok := cl.Net.Conn.(*conn)
		if !ok {
			break
		}
		if pk.SessionPresent && h.b.srv.Options.Capabilities.MaximumMessageExpiryInterval == 0 {
			c.resend = orderResend(cl)
		}
		h.b.resumeRetained(cl, c, pk.SessionPresent)
	}
}

// OnSessionEstablish runs after authentication, before mochi takes over
// the session a client of the same id holds, if any: a service's
// connection takes that session's retained deliveries with it.
func (h *hook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	if c, ok := takesRetained(cl); ok {
		takeOverRetained(h.b.srv, cl, c)
	}
}

// OnSessionEstablished runs after mochi's resend of a resumed session and
// before it reads the client's first packet.
func (h *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if c, ok := cl.Net.Conn.(*conn); ok && c.resend != nil {
		c.resend.restore(cl)
		c.resend = nil
	}
}

// handedOver returns pk changed so that mochi forgets it without a word:
// the broker acknowledges and delivers it itself. mochi's own way,
// ErrRejectPacket, passes the whole packet to a debug log call, which
// copies it to the heap on every publish even with debug logs off; a QoS 0
// packet marked Ignore is neither acknowledged, nor retained, nor
// delivered.
func handedOver(pk packets.Packet) packets.Packet {
	pk.FixedHeader.Qos = 0
	pk.Ignore = true
	return pk
}

// refusePublish returns what OnPublish returns for code: nil on success;
// otherwise an MQTT 5 QoS 1 publisher gets code in its PUBACK and a QoS 2
// one in its PUBREC, a QoS 0 publish is dropped, and an MQTT 3.1.1 QoS 1/2
// publisher is disconnected (see refuse311).
func (b *Broker) refusePublish(cl *mqtt.Client, id uint16, qos byte, code packets.Code) error {
	switch {
	case code == packets.CodeSuccess:
		return nil
	case cl.Properties.ProtocolVersion == 5 && qos == 2:
		// mochi answers a refusal from OnPublish with a PUBACK, which a
		// QoS 2 publisher takes for a protocol error (MQTT-3.3.4-1).
		rec := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: id, ReasonCode: code.Code}
		rec.Properties.ReasonString = code.Reason
		_ = cl.WritePacket(rec)
		return packets.ErrRejectPacket
	case cl.Properties.ProtocolVersion == 5 && qos > 0:
		return code
	case qos > 0:
		b.refuse311(cl, code)
	}
	return packets.ErrRejectPacket
}

// refuse311 disconnects an MQTT 3.1.1 client whose QoS 1/2 publish was not
// accepted (not stored, too large, over the rate). A 3.1.1 PUBACK cannot
// carry a failure, and a publish left unanswered holds one of the client's
// in-flight slots until it reconnects: a client with a full window (on a
// full disk, every slot) would stall for good. Disconnected, it reconnects
// and resends what was not acknowledged.
func (b *Broker) refuse311(cl *mqtt.Client, code packets.Code) {
	b.log.Debug().Str("id", cl.ID).Str("reason", code.Reason).Msg("broker: MQTT 3.1.1 publish refused, disconnecting")
	_ = b.srv.DisconnectClient(cl, code)
}

// retainable reports whether a retained message on topic is kept: only a
// device's own status (its last will, typically).
func retainable(role store.Role, id, topic string) bool {
	return role == store.RoleDevice && topic == topicRoot+"/"+id+"/"+levelStatus
}

// isUnder reports whether topic is base or below it.
func isUnder(topic, base string) bool {
	return strings.HasPrefix(topic, base) && (len(topic) == len(base) || topic[len(base)] == '/')
}
