package main

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// A minimal MQTT 3.1.1 client: just what the scenarios need, with no
// goroutines or queues of its own, so that the load generator spends its
// share of the two cores on TLS and the wire, the same for both brokers.

// MQTT 3.1.1 packet types.
const (
	pktConnect   = 1
	pktConnack   = 2
	pktPublish   = 3
	pktPuback    = 4
	pktSubscribe = 8
	pktSuback    = 9
	pktPingreq   = 12
	pktPingresp  = 13
	pktDisconn   = 14
)

// mqttConn is one client connection.
type mqttConn struct {
	tc   *tls.Conn
	br   *bufio.Reader
	wbuf []byte // reused for encoding; one writer goroutine
	rbuf []byte // reused for reading; one reader goroutine
}

// dialMQTT connects over mTLS, sends CONNECT with a clean session and
// waits for a successful CONNACK.
func dialMQTT(addr string, cfg *tls.Config, clientID string, keepalive uint16) (*mqttConn, error) {
	d := &net.Dialer{Timeout: 15 * time.Second}
	tc, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	c := &mqttConn{tc: tc, br: bufio.NewReaderSize(tc, 4096)}
	_ = tc.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := tc.Write(appendConnect(nil, clientID, keepalive)); err != nil {
		tc.Close()
		return nil, fmt.Errorf("send CONNECT: %w", err)
	}
	typ, _, body, err := c.readPacket()
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("read CONNACK: %w", err)
	}
	if typ != pktConnack || len(body) != 2 || body[1] != 0 {
		tc.Close()
		return nil, fmt.Errorf("CONNACK refused: type %d body % x", typ, body)
	}
	_ = tc.SetDeadline(time.Time{})
	return c, nil
}

func (c *mqttConn) close() error { return c.tc.Close() }

// disconnect sends DISCONNECT and closes.
func (c *mqttConn) disconnect() {
	_, _ = c.tc.Write([]byte{pktDisconn << 4, 0})
	_ = c.tc.Close()
}

// publish writes one PUBLISH in one write (one TLS record), as a device
// does.
func (c *mqttConn) publish(topic string, qos byte, id uint16, payload []byte) error {
	c.wbuf = appendPublish(c.wbuf[:0], topic, qos, id, payload)
	_, err := c.tc.Write(c.wbuf)
	return err
}

// subscribe sends SUBSCRIBE for one filter and checks the SUBACK.
func (c *mqttConn) subscribe(filter string, qos byte) error {
	body := []byte{0, 1}
	body = appendString(body, filter)
	body = append(body, qos)
	pk := append([]byte{pktSubscribe<<4 | 2}, encodeLength(nil, len(body))...)
	if _, err := c.tc.Write(append(pk, body...)); err != nil {
		return err
	}
	typ, _, b, err := c.readPacket()
	switch {
	case err != nil:
		return fmt.Errorf("read SUBACK: %w", err)
	case typ != pktSuback || len(b) != 3 || b[2] > 2:
		return fmt.Errorf("subscription to %s refused: type %d body % x", filter, typ, b)
	}
	return nil
}

// ping sends PINGREQ and waits for PINGRESP, skipping anything else: the
// broker answers after it has handled every packet sent before.
func (c *mqttConn) ping() error {
	if _, err := c.tc.Write([]byte{pktPingreq << 4, 0}); err != nil {
		return err
	}
	for {
		typ, _, _, err := c.readPacket()
		if err != nil {
			return fmt.Errorf("wait for PINGRESP: %w", err)
		}
		if typ == pktPingresp {
			return nil
		}
	}
}

// readPacket reads one packet; body is valid until the next read.
func (c *mqttConn) readPacket() (typ, flags byte, body []byte, err error) {
	h, err := c.br.ReadByte()
	if err != nil {
		return 0, 0, nil, err
	}
	n, err := decodeLength(c.br)
	if err != nil {
		return 0, 0, nil, err
	}
	if cap(c.rbuf) < n {
		c.rbuf = make([]byte, n)
	}
	body = c.rbuf[:n]
	if _, err := io.ReadFull(c.br, body); err != nil {
		return 0, 0, nil, err
	}
	return h >> 4, h & 0x0f, body, nil
}

func appendConnect(buf []byte, clientID string, keepalive uint16) []byte {
	var body []byte
	body = appendString(body, "MQTT")
	body = append(body, 4, 0x02) // protocol level 4 (3.1.1), clean session
	body = binary.BigEndian.AppendUint16(body, keepalive)
	body = appendString(body, clientID)
	buf = append(buf, pktConnect<<4)
	buf = encodeLength(buf, len(body))
	return append(buf, body...)
}

func appendPublish(buf []byte, topic string, qos byte, id uint16, payload []byte) []byte {
	n := 2 + len(topic) + len(payload)
	if qos > 0 {
		n += 2
	}
	buf = append(buf, pktPublish<<4|qos<<1)
	buf = encodeLength(buf, n)
	buf = appendString(buf, topic)
	if qos > 0 {
		buf = binary.BigEndian.AppendUint16(buf, id)
	}
	return append(buf, payload...)
}

// parsePublish returns the topic and payload of a PUBLISH body.
func parsePublish(flags byte, body []byte) (topic string, payload []byte, err error) {
	if len(body) < 2 {
		return "", nil, errors.New("short PUBLISH")
	}
	tl := int(binary.BigEndian.Uint16(body))
	off := 2 + tl
	if (flags>>1)&3 > 0 {
		off += 2
	}
	if off > len(body) {
		return "", nil, errors.New("short PUBLISH")
	}
	return string(body[2 : 2+tl]), body[off:], nil
}

func appendString(buf []byte, s string) []byte {
	buf = binary.BigEndian.AppendUint16(buf, uint16(len(s)))
	return append(buf, s...)
}

// encodeLength appends MQTT's variable byte integer.
func encodeLength(buf []byte, n int) []byte {
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		buf = append(buf, b)
		if n == 0 {
			return buf
		}
	}
}

func decodeLength(r io.ByteReader) (int, error) {
	n, mul := 0, 1
	for i := 0; i < 4; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return 0, err
		}
		n += int(b&0x7f) * mul
		if b&0x80 == 0 {
			return n, nil
		}
		mul *= 128
	}
	return 0, errors.New("malformed remaining length")
}
