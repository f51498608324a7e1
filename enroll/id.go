package enroll

// maxIDLen is the longest device id ValidateID accepts, in bytes.
const maxIDLen = 64

// reservedID is mochi's inline client id (mqtt.InlineClientId).
const reservedID = "inline"

// ValidateID checks a device id: 1 to 64 characters of [a-z0-9._-], the first
// a letter or digit. The id becomes a certificate CN, an MQTT client id and a
// topic level, so anything MQTT treats specially (/ + #), anything a file
// system or shell may treat specially, upper case (two ids that differ only in
// case would look like one device to a human) and non-ASCII look-alikes are
// refused. So is "inline", the client id mochi reserves for its own client:
// the broker never admits it, so a certificate for it would be useless. The
// error never quotes the input: it may be hostile or a typo'd secret, so the
// message names the rule and the position instead.
func ValidateID(id string) error {
	switch {
	case id == "":
		return Errorf(CodeIDInvalid, "id is empty")
	case id == reservedID:
		return Errorf(CodeIDInvalid, "id is reserved for the broker's own client")
	case len(id) > maxIDLen:
		return Errorf(CodeIDInvalid, "id is %d bytes long; at most %d are allowed", len(id), maxIDLen)
	case !isIDAlnum(id[0]):
		if isUpper(id[0]) {
			return Errorf(CodeIDInvalid, "id must be lower case (upper case at position 1)")
		}
		return Errorf(CodeIDInvalid, "id must start with a lower-case letter or a digit")
	}
	for i := 1; i < len(id); i++ {
		c := id[i]
		if isIDAlnum(c) || c == '.' || c == '_' || c == '-' {
			continue
		}
		if isUpper(c) {
			return Errorf(CodeIDInvalid, "id must be lower case (upper case at position %d)", i+1)
		}
		return Errorf(CodeIDInvalid, "id has a character other than a-z, 0-9, '.', '_' or '-' at position %d", i+1)
	}
	return nil
}

func isIDAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

func isUpper(c byte) bool { return 'A' <= c && c <= 'Z' }
