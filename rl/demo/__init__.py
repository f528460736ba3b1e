"""Demo and test stand-ins that run offline: tiny models built on the machine, synthetic tasks and
the masked-diffusion SFT that warms them up. Plug-ins, never imported by the library itself: a
config loads them through `plugins` (see rl.demo.tiny)."""
