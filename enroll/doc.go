// Package enroll is fleetmq's certificate authority and enrollment endpoint:
// it mints bootstrap tokens, trades a token and a CSR for a device
// certificate, renews certificates (also after expiry within a grace),
// publishes the CRL, and maps every failure to one stable public error code.
package enroll
