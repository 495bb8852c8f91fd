"""jobflow jobs: thin wrappers over the science modules, one module per stage of the loop."""
