"""The update server, layered bottom-up: ``storage`` (database, migrations, blobs), ``pki`` (fleet
CA, enrollment, mTLS listener), ``ratelimit``/``metrics``, ``context`` (shared state) and
``sharedlimits``, ``health``/``trustsync``, ``device_api`` and ``admin_api`` (routes), ``app``
(composition), ``runtime``/``config`` (process).
See docs/architecture.md; tests/test_layering.py keeps the arrows pointing down."""
