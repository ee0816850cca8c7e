"""The bottom layer: errors, registries, atomic writes, the file lock, the CPU allocator, devices,
environment metadata, timing and typed configuration. Imports nothing else from capsbench."""
