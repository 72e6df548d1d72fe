"""Fuzz tests (hypothesis): every decoder on the wire answers bad input with a FleetloopError or a
clear gRPC status, never another exception, a hang or a memory blow-up. Numbers: fuzz.json."""
