"""The admin listener's HTTP API, one module per resource (bearer tokens and roles, releases,
devices, campaigns, certificates, key rotation, TUF, MCUboot, metrics, OpenAPI)."""
