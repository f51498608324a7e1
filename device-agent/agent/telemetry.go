package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Telemetry is one sample as published on devices/{id}/telemetry.
type Telemetry struct {
	Time           string   `json:"time"` // RFC 3339 with milliseconds
	UptimeS        float64  `json:"uptime_s"`
	Load1          float64  `json:"load1"`
	Load5          float64  `json:"load5"`
	Load15         float64  `json:"load15"`
	MemTotalKB     uint64   `json:"mem_total_kb"`
	MemAvailableKB uint64   `json:"mem_available_kb"`
	DiskFreeBytes  uint64   `json:"disk_free_bytes"`
	CPUTempC       *float64 `json:"cpu_temp_c,omitempty"`
	WifiSignalDBM  *int     `json:"wifi_signal_dbm,omitempty"`
	AgentVersion   string   `json:"agent_version"`
}

// timeLayout is RFC 3339 with fixed milliseconds, so samples taken less
// than a second apart still sort by time.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

// sampler reads a Telemetry from a /proc and /sys tree.
type sampler struct {
	procRoot, sysRoot, diskPath, version string
}

// sample reads every field. The /proc files and the disk are required;
// temperature and Wi-Fi are omitted when the device has none.
func (s sampler) sample(now time.Time) (Telemetry, error) {
	t := Telemetry{Time: now.UTC().Format(timeLayout), AgentVersion: s.version}
	var err error
	if t.UptimeS, err = readUptime(filepath.Join(s.procRoot, "uptime")); err != nil {
		return t, err
	}
	if t.Load1, t.Load5, t.Load15, err = readLoadavg(filepath.Join(s.procRoot, "loadavg")); err != nil {
		return t, err
	}
	if t.MemTotalKB, t.MemAvailableKB, err = readMeminfo(filepath.Join(s.procRoot, "meminfo")); err != nil {
		return t, err
	}
	if t.DiskFreeBytes, err = diskFree(s.diskPath); err != nil {
		return t, err
	}
	if c, ok, err := readCPUTemp(filepath.Join(s.sysRoot, "class", "thermal", "thermal_zone0", "temp")); err != nil {
		return t, err
	} else if ok {
		t.CPUTempC = &c
	}
	if d, ok, err := readWifiSignal(filepath.Join(s.procRoot, "net", "wireless")); err != nil {
		return t, err
	} else if ok {
		t.WifiSignalDBM = &d
	}
	return t, nil
}

func readUptime(path string) (float64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read uptime: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 0, errors.New("parse uptime: empty")
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 0, fmt.Errorf("parse uptime: %w", err)
	}
	return v, nil
}

func readLoadavg(path string) (l1, l5, l15 float64, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("read loadavg: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return 0, 0, 0, errors.New("parse loadavg: too few fields")
	}
	var v [3]float64
	for i := range v {
		if v[i], err = strconv.ParseFloat(f[i], 64); err != nil {
			return 0, 0, 0, fmt.Errorf("parse loadavg: %w", err)
		}
	}
	return v[0], v[1], v[2], nil
}

// readMeminfo returns MemTotal and MemAvailable in kB. Kernels before 3.14
// have no MemAvailable; MemFree + Buffers + Cached approximates it there.
func readMeminfo(path string) (total, avail uint64, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, fmt.Errorf("read meminfo: %w", err)
	}
	vals := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		if v, err := strconv.ParseUint(f[0], 10, 64); err == nil {
			vals[name] = v
		}
	}
	total, ok := vals["MemTotal"]
	if !ok {
		return 0, 0, errors.New("parse meminfo: no MemTotal")
	}
	avail, ok = vals["MemAvailable"]
	if !ok {
		avail = vals["MemFree"] + vals["Buffers"] + vals["Cached"]
	}
	return total, avail, nil
}

func diskFree(path string) (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return uint64(st.Bavail) * uint64(st.Bsize), nil
}

// readCPUTemp reads a thermal zone in millidegrees Celsius; ok is false
// when the zone does not exist.
func readCPUTemp(path string) (c float64, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read cpu temperature: %w", err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("parse cpu temperature: %w", err)
	}
	return float64(v) / 1000, true, nil
}

// readWifiSignal returns the signal level of the first interface listed in
// /proc/net/wireless; ok is false without a wireless interface.
//
//	Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE
//	 face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22
//	 wlan0: 0000   70.  -40.  -256        0      0      0      0      0        0
func readWifiSignal(path string) (dbm int, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read wireless: %w", err)
	}
	lines := strings.Split(string(b), "\n")
	for _, line := range lines[min(2, len(lines)):] {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasSuffix(f[0], ":") {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSuffix(f[3], "."), 64)
		if err != nil {
			return 0, false, fmt.Errorf("parse wireless level: %w", err)
		}
		// The kernel prints dBm levels already made negative; a positive
		// level is in driver-relative units, not dBm.
		if v >= 0 {
			return 0, false, nil
		}
		return int(v), true, nil
	}
	return 0, false, nil
}
