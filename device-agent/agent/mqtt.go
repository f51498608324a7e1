package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// sendWindow is how many queued messages are in flight at once. PUBACKs of
// one connection come back in order, so acknowledging in order is exact.
const sendWindow = 16

const (
	statusOnline  = "online"
	statusOffline = "offline"
)

// offlineTimeout bounds the "offline" publish at shutdown.
const offlineTimeout = 3 * time.Second

// session runs one MQTT connection until it fails, the identity changes or
// ctx ends; connected reports whether the broker accepted the connection.
// paho's own reconnect is off: each attempt is a fresh client, so
// every connection goes through the clock and revocation checks of
// connectLoop, and the offline queue (not paho's store) holds the messages.
func (a *runner) session(ctx context.Context, id *identity, broker string, changed <-chan struct{}) (connected bool, _ error) {
	lost := make(chan error, 1)
	msgs := make(chan mqtt.Message, 16)
	statusTopic := deviceTopic(id.deviceID, topicStatus)

	var certAsked atomic.Bool
	tlsConf := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    id.roots,
		Time:       a.cfg.Now,
		// Called on every handshake: a renewed certificate is used from the
		// next connection without restarting the process.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			certAsked.Store(true)
			cur, _, _ := a.current()
			return &cur.cert, nil
		},
	}
	opts := mqtt.NewClientOptions().
		AddBroker(broker).
		SetClientID(id.deviceID).
		SetProtocolVersion(4). // else a refused CONNECT is retried as 3.1
		SetTLSConfig(tlsConf).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(a.cfg.KeepAlive).
		SetConnectTimeout(a.cfg.ConnectTimeout).
		SetWriteTimeout(a.cfg.PublishTimeout).
		SetBinaryWill(statusTopic, []byte(statusOffline), 1, true).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			select {
			case lost <- err:
			default:
			}
		})
	c := mqtt.NewClient(opts)
	// paho bounds the attempt by ConnectTimeout itself; the extra margin
	// only guards against a token that never completes. ctx is watched
	// too: a broker that accepts TCP and never answers must not keep a
	// stopping agent past systemd's TimeoutStopSec (30 s), or it is killed
	// before it saves the queue's delivery pointer.
	if err := await(ctx, c.Connect(), a.cfg.ConnectTimeout+5*time.Second); err != nil {
		if errors.Is(err, errTokenTimeout) || ctx.Err() != nil {
			// Returns at once; paho ends the attempt in the background
			// (the process is exiting, or the next attempt is a new client).
			c.Disconnect(0)
		}
		if !certAsked.Load() && droppedAfterDial(err) {
			err = fmt.Errorf("%w: %w", errClosedBeforeCert, err)
		}
		if handshakeTimedOut(err) {
			// paho and crypto/tls say only "context deadline exceeded".
			err = fmt.Errorf("the broker took the TCP connection but did not complete the TLS handshake within %s "+
				"(a broker that hangs, or another program on its port): %w", a.cfg.ConnectTimeout, err)
		}
		return false, caAdvice(hostAdvice(fmt.Errorf("connect %s: %w", broker, err), brokerHost(broker)))
	}
	a.sessions.Add(1) // the broker took the certificate (see hintRenew)

	sctx, cancel := context.WithCancel(ctx)
	sendErr := make(chan error, 1)
	senderRunning := false
	stop := func() {
		cancel()
		c.Disconnect(250) // fails the tokens the sender waits on
		if senderRunning {
			<-sendErr
		}
		a.saveState(context.WithoutCancel(ctx), func(s *State) {
			s.Connected = false
			s.ConnectedChanged = a.cfg.Now()
		})
	}

	shutdown := func() {
		// A clean DISCONNECT discards the will, so say it ourselves;
		// briefly: systemd allows 30 s for the whole stop.
		if t := c.Publish(statusTopic, 1, true, statusOffline); !t.WaitTimeout(offlineTimeout) || t.Error() != nil {
			a.log.Warn().Err(t.Error()).Msg("publish offline status")
		}
		stop()
	}

	if err := a.wait(ctx, c.Publish(statusTopic, 1, true, statusOnline)); err != nil {
		if ctx.Err() != nil {
			// "online" may have reached the broker: take it back.
			shutdown()
			return true, nil
		}
		stop()
		return true, fmt.Errorf("publish status: %w", err)
	}
	handler := func(_ mqtt.Client, m mqtt.Message) {
		// Runs on paho's router: never block it.
		select {
		case msgs <- m:
		default:
			a.log.Warn().Msg("command dropped: too many pending")
		}
	}
	filter := deviceTopic(id.deviceID, topicCommands) + "/#"
	st := c.Subscribe(filter, 1, handler)
	if err := a.wait(ctx, st); err != nil {
		if ctx.Err() != nil {
			shutdown()
			return true, nil
		}
		stop()
		return true, fmt.Errorf("subscribe: %w", err)
	}
	if sub, ok := st.(*mqtt.SubscribeToken); ok && sub.Result()[filter] == 0x80 {
		stop()
		return true, errors.New("subscribe: refused by the broker")
	}

	a.setCondition(ctx, "", nil)
	a.saveState(ctx, func(s *State) {
		s.Connected = true
		s.ConnectedChanged = a.cfg.Now()
	})
	a.log.Info().Str("broker", broker).Str("serial", id.serial()).Msg("connected")

	senderRunning = true
	go func() { sendErr <- a.sendLoop(sctx, c, id.deviceID) }()
	for {
		select {
		case <-ctx.Done():
			shutdown()
			return true, nil
		case err := <-lost:
			stop()
			return true, fmt.Errorf("connection lost: %w", err)
		case <-changed:
			a.log.Info().Msg("certificate changed; reconnecting with it")
			stop()
			return true, errIdentityChanged
		case err := <-sendErr:
			senderRunning = false
			if ctx.Err() != nil { // the sender saw the shutdown first
				shutdown()
				return true, nil
			}
			stop()
			return true, err
		case m := <-msgs:
			a.handleMessage(ctx, c, id, m)
		}
	}
}

// errClosedBeforeCert marks a connection the broker closed before it asked
// for the client certificate: it never saw the certificate, so this is no
// refusal of it. fleetmq does this at its connection limit, at its limit
// of connections still in their handshake from one address (many devices
// behind one NAT connecting at once), and at its handshake deadline when
// the link is too slow to get that far.
var errClosedBeforeCert = errors.New("the broker closed the connection before asking for the certificate: " +
	"it is at its connection limit (fleetmq --max-connections, or --max-pending-per-address when many devices " +
	"connect at once from one address) or overloaded, or the link is too slow for its handshake deadline " +
	"(fleetmq --handshake-timeout); this device is not refused, retrying")

// handshakeTimedOut reports a connection attempt whose TLS handshake ran
// out of time: a deadline, but not the TCP dial's ("dial tcp: i/o
// timeout", which says what it is).
func handshakeTimedOut(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return false
	}
	return errors.Is(err, context.DeadlineExceeded)
}

// brokerHost is the host of a broker URL, for messages.
func brokerHost(broker string) string {
	u, err := url.Parse(broker)
	if err != nil {
		return broker
	}
	return u.Hostname()
}

// errTokenTimeout is returned by await when the broker did not answer in time.
var errTokenTimeout = errors.New("timed out waiting for the broker")

// await waits for a paho token until it completes, d passes or ctx ends.
// paho's Wait can hang forever, and WaitTimeout cannot be interrupted: a
// broker that stops answering would hold a stopping agent for the whole
// timeout.
func await(ctx context.Context, t mqtt.Token, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return errTokenTimeout
	}
}

// wait waits for a publish or subscribe token, see await.
func (a *runner) wait(ctx context.Context, t mqtt.Token) error {
	return await(ctx, t, a.cfg.PublishTimeout)
}

// sendLoop drains the queue in order with QoS 1, removing a message only
// after its PUBACK. Any failure ends the session; the next one resends from
// the first unacknowledged message.
func (a *runner) sendLoop(ctx context.Context, c mqtt.Client, deviceID string) error {
	for {
		recs, err := a.q.Peek(sendWindow)
		if err != nil {
			return err
		}
		if len(recs) == 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-a.q.Ready():
				continue
			}
		}
		toks := make([]mqtt.Token, len(recs))
		for i, r := range recs {
			toks[i] = c.Publish(deviceTopic(deviceID, r.Topic), 1, false, r.Payload)
		}
		for i, t := range toks {
			if err := a.wait(ctx, t); err != nil {
				return fmt.Errorf("publish queued message: %w", err)
			}
			if err := a.q.Ack(recs[i].Seq); err != nil {
				return err
			}
		}
	}
}

// handleMessage executes a command; anything else gets an error event.
// It runs on the session's loop, so its waits watch ctx: a stop must not
// wait for a broker that no longer acknowledges.
func (a *runner) handleMessage(ctx context.Context, c mqtt.Client, id *identity, m mqtt.Message) {
	cmd, cerr := parseCommand(id.deviceID, m.Topic(), m.Payload(), m.Retained())
	now := a.cfg.Now()
	if cerr == nil && cmd.kind == cmdRenew {
		cerr = a.admitRenewCommand(now)
	}
	if cerr != nil {
		a.log.Warn().Str("command", cmd.name).Str("code", cerr.Code).Str("reason", cerr.Message).Msg("command refused")
		a.publishEvent(ctx, c, deviceTopic(id.deviceID, topicError), errorEventPayload(now, cmd.name, cerr))
		return
	}
	switch cmd.kind {
	case cmdPing:
		a.publishEvent(ctx, c, deviceTopic(id.deviceID, topicPong), pongPayload(now, cmd.payload))
	case cmdRenew:
		a.log.Info().Msg("renewal requested by command")
		a.requestRenew()
	case cmdInterval:
		a.setInterval(cmd.interval)
	}
}

func (a *runner) publishEvent(ctx context.Context, c mqtt.Client, topic string, payload []byte) {
	if err := a.wait(ctx, c.Publish(topic, 1, false, payload)); err != nil {
		a.log.Warn().Err(err).Str("topic", topic).Msg("publish event")
	}
}
