// Package agent is the fleetmq device agent: it enrolls a device with a
// bootstrap token, keeps its certificate fresh, samples telemetry and
// delivers it over MQTT with mTLS through a durable on-disk queue.
//
// It deliberately links nothing from the server side (store, broker, mochi,
// bbolt): the binary built from it runs on a Raspberry Pi Zero and must stay
// small.
//
// # Concurrency between processes
//
// Several device-agent processes may touch one state folder: the long-running
// `run`, and the `enroll`, `renew` and `status` commands. Three flock(2) locks
// in the folder keep them apart:
//
//   - run.lock is held by `run` for its whole life, so two agents never
//     deliver the same queue; `status` probes it to tell whether an agent runs.
//   - identity.lock is held around every change of the key pair (enroll,
//     renew), including the HTTPS request, so two renewals never race;
//     `status` takes it shared (opened read-only, never created) while it
//     checks the key pair, so it does not mistake a commit for a break.
//   - state.lock is held for the short read-modify-write of state.json.
//
// `device-agent renew` renews by itself under identity.lock. A running agent
// notices the new certificate by watching cert.pem (every
// Config.CertCheckInterval, one minute by default), then reconnects to the
// broker with it; its own renewals reload from disk first, so a renewal done
// by the command is adopted rather than repeated.
package agent
