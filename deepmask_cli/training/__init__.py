"""Training DeepMask and SharpMask: data and sampler, feature cache, copy-paste, the loop. Imports viz and below; not evaluation or export."""
