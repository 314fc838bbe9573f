"""Eight CPU devices for the whole session (must be set before JAX is imported), so sharded
tests run in-process; single-device tests simply use the first device."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
