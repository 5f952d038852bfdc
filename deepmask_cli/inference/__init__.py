"""From a photo to ranked proposals: the pyramid, ``Proposer``, post-processing and runtime selection. Imports modeling, formats and core."""
