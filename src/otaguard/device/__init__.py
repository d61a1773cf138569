"""Device runtime: flash model + fault injection, secure storage, bootloader, update agent.

Entry points: :class:`~otaguard.device.device.Device` (a simulated device in a directory),
:class:`~otaguard.device.agent.UpdateAgent` with a pluggable
:class:`~otaguard.device.transport.Transport`, :class:`~otaguard.device.bootloader.Bootloader`.
See ``docs/reliability.md`` for the power-cut model and proofs.
"""
