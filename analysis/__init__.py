"""GPU idle intervals and blame: pure numpy over wire-schema tables; knows nothing of sockets, BCC or NVML."""
