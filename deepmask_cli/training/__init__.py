"""Training DeepMask and SharpMask: data and sampler, feature cache, copy-paste, modes, the loop and its run folders. Imports viz and below; not evaluation or export."""
