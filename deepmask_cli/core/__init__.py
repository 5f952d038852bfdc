"""Config dataclasses, errors, atomic files, output safety, memory and the launcher's environment: imports nothing of deepmask_cli outside core."""
