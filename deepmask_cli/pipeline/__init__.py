"""Files in, results out: decode, propose, sinks, shards, resume and torchrun launches. Imports every layer below it."""
