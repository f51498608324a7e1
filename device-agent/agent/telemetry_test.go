package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeTree writes files under a temp root: name → content.
func fakeTree(tb testing.TB, files map[string]string) string {
	tb.Helper()
	root := tb.TempDir()
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return root
}

const (
	fakeMeminfo = `MemTotal:         948304 kB
MemFree:          512000 kB
MemAvailable:     700100 kB
Buffers:           20000 kB
Cached:           150000 kB
`
	fakeWireless = `Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE
 face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22
 wlan0: 0000   70.  -41.  -256        0      0      0      0      0        0
`
)

func TestSampleFullPi(t *testing.T) {
	proc := fakeTree(t, map[string]string{
		"uptime":       "12345.67 40000.00\n",
		"loadavg":      "0.52 0.58 0.59 1/187 1234\n",
		"meminfo":      fakeMeminfo,
		"net/wireless": fakeWireless,
	})
	sys := fakeTree(t, map[string]string{"class/thermal/thermal_zone0/temp": "48312\n"})
	s := sampler{procRoot: proc, sysRoot: sys, diskPath: t.TempDir(), version: "v1.2.3"}
	now := time.Date(2025, 3, 4, 5, 6, 7, 890_000_000, time.UTC)
	tel, err := s.sample(now)
	if err != nil {
		t.Fatal(err)
	}
	if tel.Time != "2025-03-04T05:06:07.890Z" {
		t.Errorf("time %q", tel.Time)
	}
	if tel.UptimeS != 12345.67 || tel.Load1 != 0.52 || tel.Load5 != 0.58 || tel.Load15 != 0.59 {
		t.Errorf("uptime/load = %v %v %v %v", tel.UptimeS, tel.Load1, tel.Load5, tel.Load15)
	}
	if tel.MemTotalKB != 948304 || tel.MemAvailableKB != 700100 {
		t.Errorf("mem = %d/%d", tel.MemTotalKB, tel.MemAvailableKB)
	}
	if tel.DiskFreeBytes == 0 {
		t.Error("disk free is 0")
	}
	if tel.CPUTempC == nil || *tel.CPUTempC != 48.312 {
		t.Errorf("cpu temp %v", tel.CPUTempC)
	}
	if tel.WifiSignalDBM == nil || *tel.WifiSignalDBM != -41 {
		t.Errorf("wifi %v", tel.WifiSignalDBM)
	}
	if tel.AgentVersion != "v1.2.3" {
		t.Errorf("version %q", tel.AgentVersion)
	}
	b, _ := json.Marshal(tel)
	for _, k := range []string{`"time"`, `"uptime_s"`, `"load1"`, `"load5"`, `"load15"`, `"mem_total_kb"`,
		`"mem_available_kb"`, `"disk_free_bytes"`, `"cpu_temp_c"`, `"wifi_signal_dbm"`, `"agent_version"`} {
		if !strings.Contains(string(b), k) {
			t.Errorf("JSON lacks %s: %s", k, b)
		}
	}
}

func TestSampleWithoutOptionalSensors(t *testing.T) {
	proc := fakeTree(t, map[string]string{
		"uptime":  "5.00 1.00\n",
		"loadavg": "0.00 0.01 0.05 1/80 99\n",
		// An old kernel without MemAvailable.
		"meminfo": "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 30 kB\n",
		// A wireless file with headers but no interface.
		"net/wireless": strings.Join(strings.Split(fakeWireless, "\n")[:2], "\n") + "\n",
	})
	s := sampler{procRoot: proc, sysRoot: t.TempDir(), diskPath: t.TempDir(), version: "dev"}
	tel, err := s.sample(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if tel.MemAvailableKB != 150 {
		t.Errorf("fallback MemAvailable = %d, want 150", tel.MemAvailableKB)
	}
	if tel.CPUTempC != nil || tel.WifiSignalDBM != nil {
		t.Errorf("absent sensors reported: %v %v", tel.CPUTempC, tel.WifiSignalDBM)
	}
	b, _ := json.Marshal(tel)
	if strings.Contains(string(b), "cpu_temp_c") || strings.Contains(string(b), "wifi_signal_dbm") {
		t.Errorf("absent sensors not omitted: %s", b)
	}
}

func TestSampleErrors(t *testing.T) {
	good := map[string]string{"uptime": "1 1\n", "loadavg": "1 2 3 1/1 1\n", "meminfo": fakeMeminfo}
	cases := map[string]map[string]string{
		"no uptime":       {"loadavg": good["loadavg"], "meminfo": fakeMeminfo},
		"bad loadavg":     {"uptime": good["uptime"], "loadavg": "x y z\n", "meminfo": fakeMeminfo},
		"short loadavg":   {"uptime": good["uptime"], "loadavg": "1 2\n", "meminfo": fakeMeminfo},
		"no MemTotal":     {"uptime": good["uptime"], "loadavg": good["loadavg"], "meminfo": "MemFree: 1 kB\n"},
		"bad temperature": {"uptime": good["uptime"], "loadavg": good["loadavg"], "meminfo": fakeMeminfo},
	}
	for name, files := range cases {
		t.Run(name, func(t *testing.T) {
			sys := t.TempDir()
			if name == "bad temperature" {
				sys = fakeTree(t, map[string]string{"class/thermal/thermal_zone0/temp": "hot\n"})
			}
			s := sampler{procRoot: fakeTree(t, files), sysRoot: sys, diskPath: t.TempDir()}
			if _, err := s.sample(time.Now()); err == nil {
				t.Error("no error")
			}
		})
	}
}

func TestReadWifiSignalNonDBM(t *testing.T) {
	// Drivers without dBm report a positive relative level: not a dBm value.
	root := fakeTree(t, map[string]string{"w": strings.Replace(fakeWireless, "-41.", " 60.", 1)})
	if _, ok, err := readWifiSignal(filepath.Join(root, "w")); err != nil || ok {
		t.Errorf("readWifiSignal = ok %v, %v; want not ok", ok, err)
	}
}
