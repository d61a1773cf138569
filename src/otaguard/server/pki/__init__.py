"""The fleet PKI and the TLS edge: fleet CA, enrollment, certificate renewal checks, the mTLS
listener with its deadlines, and rate-limited logging of failed handshakes."""
