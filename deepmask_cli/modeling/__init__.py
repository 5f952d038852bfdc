"""The networks (``nn.Module``s only: trunks, heads, refinement, ``build_model``) and weights folders. Imports formats and core."""
