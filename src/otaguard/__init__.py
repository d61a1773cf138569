"""otaguard: a secure over-the-air firmware update pipeline."""

__version__ = "0.1.0"
