"""The device listener's HTTP API: identity from the client certificate, per-device limits and
probe detection, and the endpoints devices call (check-in, reports, manifests, images, key
list, certificate renewal, TUF)."""
